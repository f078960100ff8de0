package dsm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/machine"
)

// Slices as processes: the test binary re-executes itself with
// childEnv set; the child runs one slice on the listener inherited as fd 3
// and prints a childResult as JSON on stdout.
const childEnv = "HPCVM_DSM_TEST_SLICE"

type childSpec struct {
	ID         int
	Addrs      []string
	Placement  [][]int
	Prog       string
	Iters      int
	SecretFile string
}

type childResult struct {
	Reports []uint32
	Finals  []uint64
	Stats   StatsSnapshot
	Exit    string
	Reason  string
	Err     string
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(childMain(spec))
	}
	os.Exit(m.Run())
}

func childMain(specJSON string) int {
	var spec childSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintf(os.Stderr, "slice child: bad spec: %v\n", err)
		return 2
	}
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// vCPU threads sit in KVM_RUN and the fault reader in poll(2), each
	// holding a P until sysmon takes it back: leave Ps for the protocol.
	runtime.GOMAXPROCS(SliceGOMAXPROCS(len(spec.Placement[spec.ID]), len(spec.Addrs)))
	ln, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "slice %d: inherited listener: %v\n", spec.ID, err)
		return 2
	}
	secret, err := os.ReadFile(spec.SecretFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "slice %d: %v\n", spec.ID, err)
		return 2
	}
	rep := &reportDev{}
	var finals []uint64
	cfg := sliceSpec(spec.ID, spec.Addrs, ln, spec.Placement, spec.Prog, spec.Iters, rep, &finals, lg)
	cfg.Transport.Secret = secret
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := RunSlice(ctx, cfg)
	out := childResult{Reports: rep.reports, Finals: finals, Stats: res.Stats, Exit: res.Exit.Kind.String(), Reason: res.Exit.Reason}
	if err != nil {
		out.Err = err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(out)
	if err != nil || res.Exit.Kind != machine.ExitPoweroff {
		return 1
	}
	return 0
}

type child struct {
	cmd    *exec.Cmd
	stdout bytes.Buffer
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

// startSlices starts n slice processes running prog.
func startSlices(t *testing.T, n, ncpu int, prog string, iters int) []*child {
	t.Helper()
	requireKVMAndUFFD(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, testSecret, 0o600); err != nil {
		t.Fatal(err)
	}
	lns, addrs := loopbackListeners(t, n)
	vc := splitVCPUs(ncpu, n)
	var kids []*child
	for i := 0; i < n; i++ {
		spec, _ := json.Marshal(childSpec{ID: i, Addrs: addrs, Placement: vc, Prog: prog, Iters: iters, SecretFile: secretFile})
		f, err := lns[i].(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		c := &child{done: make(chan struct{})}
		c.cmd = exec.Command(exe, "-test.run=^$")
		c.cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
		c.cmd.ExtraFiles = []*os.File{f}
		c.cmd.Stdout, c.cmd.Stderr = &c.stdout, &c.stderr
		if err := c.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		lns[i].Close()
		go func() { c.err = c.cmd.Wait(); close(c.done) }()
		kids = append(kids, c)
	}
	t.Cleanup(func() {
		for _, c := range kids {
			c.cmd.Process.Kill()
			<-c.done
		}
	})
	return kids
}

func (c *child) wait(t *testing.T, timeout time.Duration) childResult {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(timeout):
		c.cmd.Process.Kill()
		<-c.done
		t.Fatalf("slice process %v did not exit within %v; stderr:\n%s", c.cmd.Args, timeout, c.stderr.String())
	}
	var r childResult
	if err := json.Unmarshal(c.stdout.Bytes(), &r); err != nil {
		r.Err = fmt.Sprintf("no result (%v); exit %v; stderr:\n%s", err, c.err, c.stderr.String())
	}
	return r
}

// runProcesses runs prog on n slice processes and collects the results.
func runProcesses(t *testing.T, n, ncpu int, prog string, iters int) vmRun {
	t.Helper()
	start := time.Now()
	kids := startSlices(t, n, ncpu, prog, iters)
	var out vmRun
	for i, c := range kids {
		r := c.wait(t, 4*time.Minute)
		if r.Err != "" || r.Exit != machine.ExitPoweroff.String() {
			t.Fatalf("slice %d: exit %s (%s): %s", i, r.Exit, r.Reason, r.Err)
		}
		out.reports = append(out.reports, r.Reports...)
		out.stats = append(out.stats, r.Stats)
		if i == 0 {
			out.finals = r.Finals
		}
	}
	out.elapsed = time.Since(start)
	sort.Slice(out.reports, func(a, b int) bool { return out.reports[a] < out.reports[b] })
	return out
}

// TestCoherenceThreeSliceProcesses runs the memory-model micro-guests on
// three slice processes (one vCPU each unless the case says more) over
// loopback TCP.
func TestCoherenceThreeSliceProcesses(t *testing.T) {
	for _, c := range coherenceCases {
		t.Run(c.name, func(t *testing.T) {
			ncpu, iters := c.ncpu, scaled(c.iters/4)
			if ncpu < 3 && c.prog != "mp" && !strings.HasPrefix(c.prog, "sb") {
				ncpu = 3
			}
			r := runProcesses(t, 3, ncpu, c.prog, iters)
			for _, ck := range c.checks {
				ck(t, ncpu, iters, r)
			}
			t.Logf("%s on 3 processes, %d vCPUs: %v", c.prog, ncpu, r)
		})
	}
}

// TestSliceKilledStopsOthers kills one slice process mid-run: the others
// must stop with an error naming it, promptly (nothing may hang on pages
// the dead slice owned).
func TestSliceKilledStopsOthers(t *testing.T) {
	kids := startSlices(t, 3, 3, "pingpong", 1<<30)
	// Let the guest get going (pages moving between all three).
	time.Sleep(2 * time.Second)
	for i, k := range kids {
		select {
		case <-k.done:
			t.Fatalf("slice %d exited early: %v\nstdout: %s\nstderr: %s", i, k.err, k.stdout.String(), k.stderr.String())
		default:
		}
	}
	killed := time.Now()
	if err := kids[2].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		r := kids[i].wait(t, 30*time.Second)
		took := time.Since(killed)
		if r.Err == "" {
			t.Fatalf("slice %d exited without error after slice 2 was killed: %+v", i, r)
		}
		if !strings.Contains(r.Err, "slice 2") {
			t.Fatalf("slice %d error does not name slice 2: %s", i, r.Err)
		}
		var ee *exec.ExitError
		if !errors.As(kids[i].err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("slice %d exit status %v, want 1", i, kids[i].err)
		}
		t.Logf("slice %d stopped %v after the kill: %s", i, took.Round(time.Millisecond), r.Err)
	}
}
