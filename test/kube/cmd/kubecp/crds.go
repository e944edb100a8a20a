package main

// The manifests `up` installs: CRD files exactly as their modules publish them (and the
// ValidatingAdmissionPolicy that Gateway API ships beside its standard CRDs), created through
// the API server's REST API.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// collections maps the kinds a manifest may hold to where they are created (all cluster-scoped).
var collections = map[string]string{
	"apiextensions.k8s.io/v1/CustomResourceDefinition":                 "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
	"admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy":        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
	"admissionregistration.k8s.io/v1/ValidatingAdmissionPolicyBinding": "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
}

// manifest is one YAML document as JSON, with what install needs to know about it.
type manifest struct {
	source     string
	apiVersion string
	kind       string
	name       string
	json       []byte
}

func (m manifest) isCRD() bool {
	return m.apiVersion == "apiextensions.k8s.io/v1" && m.kind == "CustomResourceDefinition"
}

// loadManifests reads every document of paths (files, or directories of *.yaml in name order),
// keeping CRDs whose group is in groups (all if groups is empty) and every non-CRD object.
func loadManifests(paths, groups []string) ([]manifest, error) {
	var files []string
	for _, path := range paths {
		info, err := os.Stat(path)
		if err != nil {
			return nil, err
		}
		if !info.IsDir() {
			files = append(files, path)
			continue
		}
		matches, err := filepath.Glob(filepath.Join(path, "*.yaml"))
		if err != nil {
			return nil, err
		}
		if len(matches) == 0 {
			return nil, fmt.Errorf("%s: no *.yaml files", path)
		}
		sort.Strings(matches)
		files = append(files, matches...)
	}
	var out []manifest
	for _, file := range files {
		docs, err := readDocuments(file)
		if err != nil {
			return nil, err
		}
		for _, m := range docs {
			if _, ok := collections[m.apiVersion+"/"+m.kind]; !ok {
				return nil, fmt.Errorf("%s: %s %s %q: kubecp does not know where to create this kind", file, m.apiVersion, m.kind, m.name)
			}
			if m.isCRD() && len(groups) > 0 {
				var crd struct {
					Spec struct {
						Group string `json:"group"`
					} `json:"spec"`
				}
				if err := json.Unmarshal(m.json, &crd); err != nil {
					return nil, fmt.Errorf("%s: %q: %w", file, m.name, err)
				}
				if !slices.Contains(groups, crd.Spec.Group) {
					continue
				}
			}
			out = append(out, m)
		}
	}
	return out, nil
}

func readDocuments(file string) ([]manifest, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var out []manifest
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		data, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		if len(bytes.TrimSpace(data)) == 0 || string(bytes.TrimSpace(data)) == "null" {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(data, &head); err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		out = append(out, manifest{source: file, apiVersion: head.APIVersion, kind: head.Kind, name: head.Metadata.Name, json: data})
	}
}

// install creates every manifest (an existing one is left as it is) and returns the CRD names.
func install(client *http.Client, server string, docs []manifest) ([]string, error) {
	var crds []string
	for _, m := range docs {
		resp, err := client.Post(server+collections[m.apiVersion+"/"+m.kind], "application/json", bytes.NewReader(m.json))
		if err != nil {
			return nil, fmt.Errorf("%s %q: %w", m.kind, m.name, err)
		}
		// Read the whole answer (the object echoed back) so the server's write completes.
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if len(body) > 4096 {
			body = body[:4096]
		}
		if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusConflict {
			return nil, fmt.Errorf("%s %q from %s: %s: %s", m.kind, m.name, m.source, resp.Status, body)
		}
		if m.isCRD() {
			crds = append(crds, m.name)
		}
	}
	return crds, nil
}

// established succeeds once every CRD in names has the condition Established=True and every
// version it serves answers a list: right after Established a list can still be refused with
// 429 "storage is (re)initializing" until the resource's watch cache has synced.
func established(ctx context.Context, client *http.Client, server string, names []string) error {
	var waiting []string
	for _, name := range names {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet,
			server+"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"+name, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		var crd struct {
			Spec struct {
				Group string `json:"group"`
				Names struct {
					Plural string `json:"plural"`
				} `json:"names"`
				Versions []struct {
					Name   string `json:"name"`
					Served bool   `json:"served"`
				} `json:"versions"`
			} `json:"spec"`
			Status struct {
				Conditions []struct {
					Type, Status, Reason, Message string
				} `json:"conditions"`
			} `json:"status"`
		}
		err = json.NewDecoder(resp.Body).Decode(&crd)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil {
			return fmt.Errorf("CRD %s: %s %v", name, resp.Status, err)
		}
		ok := false
		for _, c := range crd.Status.Conditions {
			if c.Type == "Established" && c.Status == "True" {
				ok = true
			}
		}
		if !ok {
			waiting = append(waiting, name)
			continue
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			path := fmt.Sprintf("/apis/%s/%s/%s?limit=1", crd.Spec.Group, v.Name, crd.Spec.Names.Plural)
			if err := get(ctx, client, server+path, `"kind":"`); err != nil {
				waiting = append(waiting, fmt.Sprintf("%s %s (%v)", name, v.Name, err))
			}
		}
	}
	if len(waiting) > 0 {
		return fmt.Errorf("not Established and listable yet: %s", strings.Join(waiting, ", "))
	}
	return nil
}
