// Command kubecp starts and stops a real control plane on loopback for tests and the demo: etcd
// and kube-apiserver, built by scripts/kube-up from the modules pinned in this module's go.mod,
// with the CRDs the agents read installed.
//
//	kubecp up DIR [--crd PATH]... [--crd-group GROUP]... [--until-stdin-closes]
//	kubecp down DIR
//	kubecp restart DIR NAME [--down-for DURATION] [--signal KILL|TERM]
//	kubecp compact DIR
//
// up generates a CA, a serving certificate, an admin client certificate (group
// system:masters) and a service-account key pair; starts etcd and kube-apiserver in the
// background on free ports of 127.0.0.1 (their logs in DIR/*.log, their pids in
// DIR/kubecp.json); waits for etcd's /health and the API server's /readyz; installs the CRDs;
// waits until they are Established; and only then writes DIR/kubeconfig, so its existence means
// "ready". It exits 0 and leaves the servers running. Every wait is bounded; a failure prints
// the tail of the failing server's log, stops what was started and leaves DIR for inspection.
//
// With --until-stdin-closes, up also starts a small watcher process (`kubecp linger DIR`) that
// holds up's standard input and runs `down DIR` when it reaches end of file: the caller keeps
// the other end of a pipe or socket open for as long as it wants the control plane, and when it
// exits (however it exits, SIGKILL included) the kernel closes that end and the servers stop.
//
// down stops the processes recorded in DIR/kubecp.json (SIGTERM, then SIGKILL after a bound;
// a pid is signalled only if its start time still matches, so a reused pid is never hit) and
// removes DIR. It refuses a DIR that kubecp did not create.
//
// restart stops one process, etcd or kube-apiserver (SIGKILL by default, like a crash; TERM
// stops it as down does), waits --down-for, starts it again with the binary and arguments
// recorded in DIR/kubecp.json (its log appended to), records the new pid there (so down and
// linger stop the new process) and waits, bounded, until it is healthy again (etcd's /health,
// the API server's /readyz).
//
// compact compacts etcd at its current revision, physically, and prints the revision: a watch
// or list at any older resourceVersion that reaches etcd is then answered 410 Gone.
package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  kubecp up DIR [--crd PATH]... [--crd-group GROUP]... [--until-stdin-closes]
  kubecp down DIR
  kubecp restart DIR NAME [--down-for DURATION] [--signal KILL|TERM]
  kubecp compact DIR`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 3 {
		usage()
	}
	cmd, dir, rest := os.Args[1], os.Args[2], os.Args[3:]
	if strings.HasPrefix(dir, "-") {
		usage()
	}
	var err error
	switch cmd {
	case "up":
		err = up(dir, rest)
	case "down":
		if len(rest) != 0 {
			usage()
		}
		err = down(dir, 0)
	case "linger":
		err = linger(dir)
	case "restart":
		err = restart(dir, rest)
	case "compact":
		if len(rest) != 0 {
			usage()
		}
		err = compact(dir)
	default:
		usage()
	}
	if err != nil {
		var usageErr usageError
		fmt.Fprintf(os.Stderr, "kubecp %s %s: %v\n", cmd, dir, err)
		if errors.As(err, &usageErr) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }
