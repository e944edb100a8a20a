package main

// `kubecp restart DIR NAME`: one process of the control plane crashes (or stops) and comes back,
// for tests of clients that must ride out an outage; `kubecp compact DIR`: etcd forgets every
// revision before its current one, as the API server's periodic compaction does.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// restartable are the processes `restart` may restart (linger is the control plane's lifetime,
// not a part of it).
var restartable = []string{"etcd", "kube-apiserver"}

func restart(dir string, args []string) error {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return usageError{fmt.Sprintf("restart needs the NAME of a process (one of %s) before its options", strings.Join(restartable, ", "))}
	}
	name := args[0]
	fs := flag.NewFlagSet("restart", flag.ContinueOnError)
	downFor := fs.Duration("down-for", 0, "how long the process stays down before it is started again")
	signalName := fs.String("signal", "KILL", "how it is stopped: KILL (a crash) or TERM (a graceful stop, SIGKILL after a bound)")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError{err.Error()}
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Sprintf("unexpected arguments %q", fs.Args())}
	}
	if *downFor < 0 {
		return usageError{fmt.Sprintf("--down-for %s is negative", *downFor)}
	}
	if *signalName != "KILL" && *signalName != "TERM" {
		return usageError{fmt.Sprintf("--signal %q: want KILL or TERM", *signalName)}
	}
	if !slices.Contains(restartable, name) {
		return usageError{fmt.Sprintf("cannot restart %q: want one of %s", name, strings.Join(restartable, ", "))}
	}
	st, err := readState(dir)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(st.Processes, func(p process) bool { return p.Name == name })
	if i < 0 {
		return fmt.Errorf("%s names no %s process", stateFile, name)
	}
	old := st.Processes[i]
	if old.Bin == "" {
		return fmt.Errorf("%s was recorded without its command line (by an older kubecp); run down and up again", name)
	}

	started := time.Now()
	step := func(format string, a ...any) {
		fmt.Printf("kubecp: [%5.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, a...))
	}
	if *signalName == "KILL" {
		if old.alive() {
			_ = syscall.Kill(old.Pid, syscall.SIGKILL)
			if !waitGone(old, killGrace) {
				return fmt.Errorf("%s (pid %d) survived SIGKILL for %s", name, old.Pid, killGrace)
			}
		}
	} else if err := stop(old); err != nil {
		return err
	}
	// A killed process's main thread can be a zombie while its other threads still hold its
	// sockets: it is down only once its ports are free.
	if err := waitPortsFree(listenAddrs(st, old), killGrace); err != nil {
		return fmt.Errorf("%s (pid %d) stopped but %w", name, old.Pid, err)
	}
	step("%s (pid %d) stopped (SIG%s)", name, old.Pid, *signalName)
	time.Sleep(*downFor)

	r, err := start(dir, name, old.Bin, old.Args, nil)
	if err != nil {
		if _, statErr := readState(dir); statErr != nil {
			return fmt.Errorf("the control plane was stopped during the restart (%w)", statErr)
		}
		return err
	}
	// Recorded before waiting, so that down (or linger) stops the new process whatever happens
	// next.
	st.Processes[i] = r.process
	if err := writeState(dir, st); err != nil {
		return err
	}
	step("%s started again (pid %d) after %s down", name, r.Pid, *downFor)
	switch name {
	case "etcd":
		err = waitFor(r, etcdReadyBound, "etcd /health", func(ctx context.Context) error {
			return get(ctx, http.DefaultClient, st.EtcdURL+"/health", `"health":"true"`)
		})
	case "kube-apiserver":
		client, clientErr := adminClient(pkiFiles{CACert: st.CACert, AdminCert: st.AdminCert, AdminKey: st.AdminKey})
		if clientErr != nil {
			return clientErr
		}
		err = waitFor(r, apiserverReadyBound, "kube-apiserver /readyz", func(ctx context.Context) error {
			return get(ctx, client, st.Server+"/readyz", "ok")
		})
	}
	// A down that ran meanwhile (the owner went away) stopped what the state named before and
	// removed DIR: the new process is nobody's, stop it.
	if _, statErr := readState(dir); statErr != nil {
		return errors.Join(fmt.Errorf("the control plane was stopped during the restart (%w)", statErr), stop(r.process))
	}
	if err != nil {
		return err
	}
	step("%s ready", name)
	return nil
}

// listenAddrs are the host:port addresses p listens on.
func listenAddrs(st *state, p process) []string {
	var urls []string
	switch p.Name {
	case "kube-apiserver":
		urls = append(urls, st.Server)
	case "etcd":
		urls = append(urls, st.EtcdURL)
		for _, a := range p.Args {
			if peer, ok := strings.CutPrefix(a, "--listen-peer-urls="); ok {
				urls = append(urls, peer)
			}
		}
	}
	var addrs []string
	for _, u := range urls {
		_, hostPort, _ := strings.Cut(u, "://")
		addrs = append(addrs, hostPort)
	}
	return addrs
}

// waitPortsFree waits until every address can be listened on again.
func waitPortsFree(addrs []string, bound time.Duration) error {
	deadline := time.Now().Add(bound)
	for _, addr := range addrs {
		for {
			l, err := net.Listen("tcp", addr)
			if err == nil {
				l.Close()
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s is still in use after %s: %w", addr, bound, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// compact compacts etcd at its current revision through etcd's JSON gateway (physically: it
// returns once the old revisions are gone) and prints that revision.
func compact(dir string) error {
	st, err := readState(dir)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestBound)
	defer cancel()
	// A range read of one key that does not exist: the answer's header has the revision.
	var ranged struct {
		Header struct {
			Revision string `json:"revision"`
		} `json:"header"`
	}
	if err := etcdPost(ctx, st.EtcdURL+"/v3/kv/range", `{"key":"AA=="}`, &ranged); err != nil {
		return err
	}
	revision, err := strconv.ParseInt(ranged.Header.Revision, 10, 64)
	if err != nil {
		return fmt.Errorf("etcd's revision %q: %w", ranged.Header.Revision, err)
	}
	body := fmt.Sprintf(`{"revision":"%d","physical":true}`, revision)
	if err := etcdPost(ctx, st.EtcdURL+"/v3/kv/compaction", body, nil); err != nil {
		// Nothing was written since the last compaction (the API server compacts too): the
		// state asked for holds already.
		if !strings.Contains(err.Error(), "required revision has been compacted") {
			return err
		}
	}
	fmt.Printf("compacted etcd at revision %d\n", revision)
	return nil
}

// etcdPost posts a JSON body to etcd's gateway and decodes the answer into out (if not nil).
func etcdPost(ctx context.Context, url, body string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("POST %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s %s: %s: %s", url, body, resp.Status, bytes.TrimSpace(answer))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(answer, out); err != nil {
		return fmt.Errorf("POST %s: %w in %.200s", url, err, answer)
	}
	return nil
}
