package main

// Background processes: starting them detached with their output in DIR/<name>.log, the state
// file that records them, and stopping them (down, linger).

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const stateFile = "kubecp.json"

// state is DIR/kubecp.json: written as soon as the first process starts, rewritten after each.
type state struct {
	Server     string    `json:"server"`
	EtcdURL    string    `json:"etcd_url"`
	Kubeconfig string    `json:"kubeconfig"`
	CACert     string    `json:"ca_cert"`
	AdminCert  string    `json:"admin_cert"`
	AdminKey   string    `json:"admin_key"`
	Processes  []process `json:"processes"`
}

// process is one started process; StartTime (field 22 of /proc/PID/stat) tells it from a later
// process that reused the pid. Bin and Args are its command line, so `restart` can start it
// again exactly as `up` did.
type process struct {
	Name      string   `json:"name"`
	Pid       int      `json:"pid"`
	StartTime string   `json:"start_time"`
	Log       string   `json:"log"`
	Bin       string   `json:"bin"`
	Args      []string `json:"args"`
}

func writeState(dir string, st *state) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, stateFile+".tmp")
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, stateFile))
}

func readState(dir string) (*state, error) {
	data, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", stateFile, err)
	}
	return &st, nil
}

// startTime reads the start time of pid, "" if it is gone or a zombie.
func startTime(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// The command name (field 2) is in parentheses and may hold spaces: split after it.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return ""
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state), so field 22 is fields[19].
	if len(fields) < 20 || fields[0] == "Z" || fields[0] == "X" {
		return ""
	}
	return fields[19]
}

func (p process) alive() bool {
	return p.StartTime != "" && startTime(p.Pid) == p.StartTime
}

// running is a process started by this `up`, reaped by a goroutine so that its exit is seen.
type running struct {
	process
	exited chan struct{}
	err    error
}

// start runs bin with args in its own session, stdin from `stdin` (nil: /dev/null) and output
// appended to DIR/<name>.log.
func start(dir, name, bin string, args []string, stdin *os.File) (*running, error) {
	logPath := filepath.Join(dir, name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if stdin != nil {
		cmd.Stdin = stdin
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	r := &running{
		process: process{
			Name: name, Pid: cmd.Process.Pid, StartTime: startTime(cmd.Process.Pid), Log: logPath,
			Bin: bin, Args: args,
		},
		exited: make(chan struct{}),
	}
	go func() {
		r.err = cmd.Wait()
		close(r.exited)
	}()
	return r, nil
}

// logTail is the last n lines of path, indented, for error messages.
func logTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("    (no log: %v)", err)
	}
	defer f.Close()
	const window = 64 << 10
	if info, err := f.Stat(); err == nil && info.Size() > window {
		_, _ = f.Seek(info.Size()-window, io.SeekStart)
	}
	data, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// Bounds on stopping one process.
const (
	termGrace = 10 * time.Second
	killGrace = 5 * time.Second
)

func waitGone(p process, bound time.Duration) bool {
	deadline := time.Now().Add(bound)
	for p.alive() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// stop ends p: SIGTERM, then SIGKILL after termGrace.
func stop(p process) error {
	if !p.alive() {
		return nil
	}
	_ = syscall.Kill(p.Pid, syscall.SIGTERM)
	if waitGone(p, termGrace) {
		return nil
	}
	fmt.Fprintf(os.Stderr, "kubecp: %s (pid %d) still running %s after SIGTERM, sending SIGKILL\n", p.Name, p.Pid, termGrace)
	_ = syscall.Kill(p.Pid, syscall.SIGKILL)
	if waitGone(p, killGrace) {
		return nil
	}
	return fmt.Errorf("%s (pid %d) survived SIGKILL for %s", p.Name, p.Pid, killGrace)
}

// stopAll stops the processes of st in reverse start order (the API server before etcd),
// skipping pid `self`.
func stopAll(st *state, self int) error {
	var errs []error
	for i := len(st.Processes) - 1; i >= 0; i-- {
		if p := st.Processes[i]; p.Pid != self {
			errs = append(errs, stop(p))
		}
	}
	return errors.Join(errs...)
}

// down stops everything DIR/kubecp.json names (except pid `self`) and removes DIR.
func down(dir string, self int) error {
	st, err := readState(dir)
	if errors.Is(err, os.ErrNotExist) {
		if _, statErr := os.Stat(dir); errors.Is(statErr, os.ErrNotExist) {
			return nil // already down
		}
		return fmt.Errorf("no %s in it: not a kubecp directory, not touching it", stateFile)
	}
	if err != nil {
		return err
	}
	if err := stopAll(st, self); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

// upBound bounds how long linger waits for the `up` that started it to finish.
const upBound = etcdReadyBound + apiserverReadyBound + crdEstablishedBound + time.Minute

// linger waits for end of file on stdin, then runs down. SIGTERM (from down) just ends it.
// If stdin closes while `up` still runs (its caller died), up may yet start and record a
// process: linger waits for up to exit (it will, by SIGPIPE or its bounds) and then reads
// the final state.
func linger(dir string) error {
	up := os.Getppid()
	_, _ = io.Copy(io.Discard, os.Stdin)
	fmt.Printf("%s stdin closed, stopping the control plane in %s\n", time.Now().Format(time.RFC3339), dir)
	for deadline := time.Now().Add(upBound); os.Getppid() == up && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	return down(dir, os.Getpid())
}

func itoa(n int) string { return strconv.Itoa(n) }
