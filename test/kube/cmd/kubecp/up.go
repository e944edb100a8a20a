package main

// `kubecp up DIR`: certificates, etcd, kube-apiserver, CRDs, then the kubeconfig.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The API server's Service range (room for a seed's worth of shoots: each has Services) and
// the first address in it (the `kubernetes` Service).
const (
	serviceRange = "10.0.0.0/16"
	serviceIP    = "10.0.0.1"
)

// Bounds on each wait of `up`.
const (
	etcdReadyBound      = 30 * time.Second
	apiserverReadyBound = 120 * time.Second
	crdEstablishedBound = 60 * time.Second
	requestBound        = 30 * time.Second
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// freePorts binds n ports of 127.0.0.1 at once (so they differ) and releases them.
func freePorts(n int) ([]int, error) {
	var ports []int
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func up(dir string, args []string) (err error) {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	var crds, groups listFlag
	fs.Var(&crds, "crd", "a YAML file, or a directory of *.yaml, with CRDs (and Gateway API's admission policies) to install; repeatable")
	fs.Var(&groups, "crd-group", "install only CRDs of this API group (repeatable; default: every group)")
	untilStdinCloses := fs.Bool("until-stdin-closes", false, "stop the control plane when standard input reaches end of file")
	binDir := fs.String("bin-dir", "", "where etcd and kube-apiserver are (default: beside kubecp)")
	var apiserverArgs listFlag
	fs.Var(&apiserverArgs, "apiserver-arg", "one more kube-apiserver flag, e.g. --apiserver-arg=--egress-selector-config-file=F; repeatable")
	if err := fs.Parse(args); err != nil {
		return usageError{err.Error()}
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Sprintf("unexpected arguments %q", fs.Args())}
	}
	started := time.Now()
	if *binDir == "" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		*binDir = filepath.Dir(self)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, stateFile)); err == nil {
		return fmt.Errorf("already holds a control plane (%s); run `down` first", stateFile)
	}
	// Read every CRD before starting anything, so a bad path fails fast.
	docs, err := loadManifests(crds, groups)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	step := func(format string, a ...any) {
		fmt.Printf("kubecp: [%5.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, a...))
	}

	files, err := generatePKI(dir)
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	server := fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	st := &state{
		Server: server, EtcdURL: etcdURL, Kubeconfig: filepath.Join(dir, "kubeconfig"),
		CACert: files.CACert, AdminCert: files.AdminCert, AdminKey: files.AdminKey,
	}
	var procs []*running
	record := func(r *running) error {
		procs = append(procs, r)
		st.Processes = append(st.Processes, r.process)
		return writeState(dir, st)
	}
	if err := writeState(dir, st); err != nil {
		return err
	}
	// Interrupted (Ctrl-C): stop what the state file names so far, as a failure would.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		sig := <-signals
		step("%v: stopping what was started (logs stay in %s)", sig, dir)
		if recorded, err := readState(dir); err == nil {
			_ = stopAll(recorded, 0)
		}
		os.Exit(1)
	}()
	defer func() {
		if err != nil {
			step("failed; stopping what was started (logs stay in %s)", dir)
			if stopErr := stopAll(st, 0); stopErr != nil {
				err = errors.Join(err, stopErr)
			}
		}
	}()

	if *untilStdinCloses {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		r, err := start(dir, "linger", self, []string{"linger", dir}, os.Stdin)
		if err != nil {
			return err
		}
		if err := record(r); err != nil {
			return err
		}
		step("watcher started (pid %d): the control plane stops when stdin closes", r.Pid)
	}

	etcd, err := start(dir, "etcd", filepath.Join(*binDir, "etcd"), []string{
		"--name=kubecp",
		"--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=kubecp=" + peerURL,
		"--unsafe-no-fsync=true",
		"--log-level=warn",
	}, nil)
	if err != nil {
		return err
	}
	if err := record(etcd); err != nil {
		return err
	}
	step("etcd started (pid %d, %s)", etcd.Pid, etcdURL)
	if err := waitFor(etcd, etcdReadyBound, "etcd /health", func(ctx context.Context) error {
		return get(ctx, http.DefaultClient, etcdURL+"/health", `"health":"true"`)
	}); err != nil {
		return err
	}
	step("etcd healthy")

	apiserver, err := start(dir, "kube-apiserver", filepath.Join(*binDir, "kube-apiserver"), append([]string{
		"--etcd-servers=" + etcdURL,
		"--cert-dir=" + filepath.Join(dir, "pki"),
		"--tls-cert-file=" + files.ServingCert,
		"--tls-private-key-file=" + files.ServingKey,
		"--client-ca-file=" + files.CACert,
		"--secure-port=" + itoa(ports[2]),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// The API server refuses loopback addresses in Endpoints, so its own would be an error
		// every few seconds; the `kubernetes` Service simply has no endpoints here.
		"--endpoint-reconciler-type=none",
		"--service-cluster-ip-range=" + serviceRange,
		"--allow-privileged=true",
		"--disable-admission-plugins=ServiceAccount",
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + files.ServiceAccountPub,
		"--service-account-signing-key-file=" + files.ServiceAccountKey,
		"--profiling=false",
	}, apiserverArgs...), nil)
	if err != nil {
		return err
	}
	if err := record(apiserver); err != nil {
		return err
	}
	step("kube-apiserver started (pid %d, %s)", apiserver.Pid, server)
	client, err := adminClient(files)
	if err != nil {
		return err
	}
	if err := waitFor(apiserver, apiserverReadyBound, "kube-apiserver /readyz", func(ctx context.Context) error {
		return get(ctx, client, server+"/readyz", "ok")
	}); err != nil {
		return err
	}
	step("kube-apiserver ready")

	crdNames, err := install(client, server, docs)
	if err != nil {
		return fmt.Errorf("installing manifests: %w\n  kube-apiserver log:\n%s", err, logTail(apiserver.Log, 30))
	}
	step("%d objects created (%d CRDs)", len(docs), len(crdNames))
	if err := waitFor(apiserver, crdEstablishedBound, "CRDs Established and listable", func(ctx context.Context) error {
		return established(ctx, client, server, crdNames)
	}); err != nil {
		return err
	}
	step("CRDs established and listable")

	if err := writeKubeconfig(st.Kubeconfig, server, files); err != nil {
		return err
	}
	step("ready: %s (kubeconfig %s)", server, st.Kubeconfig)
	return nil
}

// waitFor retries check every 100 ms until it succeeds, the process exits or bound passes;
// the error names what was awaited and ends with the tail of the process's log.
func waitFor(r *running, bound time.Duration, what string, check func(context.Context) error) error {
	deadline := time.Now().Add(bound)
	var last error
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		last = check(ctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-r.exited:
			return fmt.Errorf("%s exited (%v) while waiting for %s (last: %v)\n  %s log (%s):\n%s",
				r.Name, r.err, what, last, r.Name, r.Log, logTail(r.Log, 30))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no %s within %s (last: %v)\n  %s log (%s):\n%s",
				what, bound, last, r.Name, r.Log, logTail(r.Log, 30))
		}
	}
}

// get succeeds when url answers 200 with a body containing want.
func get(ctx context.Context, client *http.Client, url, want string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
		return fmt.Errorf("%s: %s: %.200s", url, resp.Status, body)
	}
	return nil
}

// adminClient speaks to the API server with the admin client certificate.
func adminClient(files pkiFiles) (*http.Client, error) {
	caPEM, err := os.ReadFile(files.CACert)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s: no certificate", files.CACert)
	}
	cert, err := tls.LoadX509KeyPair(files.AdminCert, files.AdminKey)
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: requestBound,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: roots, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		}},
	}, nil
}

// writeKubeconfig writes an admin kubeconfig with everything inline, atomically: a reader that
// sees the file sees all of it.
func writeKubeconfig(path, server string, files pkiFiles) error {
	b64 := func(p string) (string, error) {
		data, err := os.ReadFile(p)
		return base64.StdEncoding.EncodeToString(data), err
	}
	ca, err := b64(files.CACert)
	if err != nil {
		return err
	}
	cert, err := b64(files.AdminCert)
	if err != nil {
		return err
	}
	key, err := b64(files.AdminKey)
	if err != nil {
		return err
	}
	config := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kubecp
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: kubecp
  context:
    cluster: kubecp
    user: admin
current-context: kubecp
`, server, ca, cert, key)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(config), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
