package launcher

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/client"
	"github.com/hpcvm/hpcvm/guest/agent/server"
	"github.com/hpcvm/hpcvm/policies"
)

// fakePolicy admits everything except the image "forbidden", with a VMM
// reserve of 128 MiB, and records the requests.
type fakePolicy struct {
	mu   sync.Mutex
	reqs []policies.Request
}

func (p *fakePolicy) Admit(_ context.Context, req policies.Request) (*policies.Effective, error) {
	p.mu.Lock()
	p.reqs = append(p.reqs, req)
	p.mu.Unlock()
	if req.Image == "forbidden" {
		return nil, &RefusedError{Message: `hpcvm: request refused by rule "x": --vm-image=forbidden is denied`}
	}
	mem := req.MemPerNode
	if mem == 0 {
		mem = 512 << 20
	}
	return &policies.Effective{Image: req.Image, Nodes: req.Nodes, VCPUs: req.CPUs, MemPerNode: mem,
		VMMReservePerNode: 128 << 20, Cgroup: policies.CgroupSettings{MemoryMax: mem + 128<<20}}, nil
}

type fakeImages struct{}

func (fakeImages) Lookup(name string) (Image, error) {
	if name == "missing" {
		return Image{}, errors.New("image missing: image not found")
	}
	return Image{Name: name, Kernel: "/k", Cmdline: "root=/dev/vda rw", AgentPort: 1024}, nil
}

// fakeGuest is a "VM" whose guest agent is the real agent server running
// in-process on a Unix socket: commands run on this machine.
type fakeGuest struct {
	agent     *client.Client
	done      chan struct{}
	stopped   chan struct{}
	once      sync.Once
	stopAgent func() // the agent stops serving (its connections close)
}

func (g *fakeGuest) Agent() *client.Client { return g.agent }
func (g *fakeGuest) Done() <-chan struct{} { return g.done }
func (g *fakeGuest) Err() error            { return errors.New("fake VM died") }
func (g *fakeGuest) Stop(context.Context) error {
	g.once.Do(func() { close(g.stopped) })
	return nil
}

type fakeBooter struct {
	t      *testing.T
	noBoot bool // the agent never answers
	plans  []*Plan
	guest  *fakeGuest
	// wrap, if set, wraps the agent's listener (kept in listener).
	wrap     func(net.Listener) net.Listener
	listener net.Listener
}

func (b *fakeBooter) Boot(ctx context.Context, p *Plan) (Guest, error) {
	b.plans = append(b.plans, p)
	sock := filepath.Join(b.t.TempDir(), "agent.sock")
	g := &fakeGuest{agent: client.New(client.Unix(sock)), done: make(chan struct{}), stopped: make(chan struct{})}
	b.guest = g
	if b.noBoot {
		return g, nil
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, err
	}
	if b.wrap != nil {
		l = b.wrap(l)
	}
	b.listener = l
	srv := server.New(server.Config{Version: "fake", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), DrainTimeout: time.Second})
	sctx, cancel := context.WithCancel(context.Background())
	go srv.Serve(sctx, l)
	b.t.Cleanup(cancel)
	g.stopAgent = cancel
	return g, nil
}

type env struct {
	l       *Launcher
	policy  *fakePolicy
	booter  *fakeBooter
	stdout  *syncBuf
	stderr  *syncBuf
	signals chan os.Signal
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var testEnviron = []string{"SLURM_JOB_ID=42", "SLURM_JOB_NODELIST=n[1-2]", "SLURM_JOB_CPUS_PER_NODE=2(x2)",
	"SLURM_MEM_PER_NODE=1500", "SLURM_JOB_USER=alice", "SLURM_PROCID=0", "SECRET_HOST_VAR=x", "PATH=/host/only"}

func newEnv(t *testing.T, argv []string, batch bool, wish Wish, extraEnv ...string) *env {
	environ := append(append([]string{}, testEnviron...), extraEnv...)
	senv, err := ParseEnv(environ)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{policy: &fakePolicy{}, booter: &fakeBooter{t: t}, stdout: &syncBuf{}, stderr: &syncBuf{}, signals: make(chan os.Signal, 4)}
	e.l = &Launcher{
		Opts: Options{Wish: wish, RuntimeDir: t.TempDir(), Batch: batch, Argv: argv, VMM: []string{"/bin/false"},
			GuestDir: filepath.Join(t.TempDir(), "guest"), BootTimeout: time.Minute, TermGrace: 10 * time.Second},
		Env: senv, Environ: environ, Policy: e.policy, Images: fakeImages{}, Booter: e.booter,
		Signals: e.signals, Stdout: e.stdout, Stderr: e.stderr, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	return e
}

func (e *env) run(t *testing.T) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return e.l.Run(ctx)
}

func writeScript(t *testing.T, body string) string {
	p := filepath.Join(t.TempDir(), "job.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBatchScriptRunsInGuest(t *testing.T) {
	script := writeScript(t, `echo "args=$* job=$SLURM_JOB_ID secret=$SECRET_HOST_VAR guest=$HPCVM_GUEST path=$PATH pwd=$(pwd)"
echo oops >&2
exit 3
`)
	e := newEnv(t, []string{script, "a", "b c"}, true, Wish{Image: "debian12"})
	if rc := e.run(t); rc != 3 {
		t.Fatalf("exit status %d, want 3; stderr: %s", rc, e.stderr)
	}
	gdir := e.l.Opts.GuestDir
	want := "args=a b c job=42 secret= guest=1 path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin pwd=" + gdir + "\n"
	if e.stdout.String() != want {
		t.Errorf("stdout = %q, want %q", e.stdout, want)
	}
	if e.stderr.String() != "oops\n" {
		t.Errorf("stderr = %q, want the script's only", e.stderr)
	}
	if b, err := os.ReadFile(filepath.Join(gdir, "slurm_script")); err != nil || !strings.Contains(string(b), "exit 3") {
		t.Errorf("script not staged into the guest: %v", err)
	}
	// Admission: all 4 CPUs, 1500 MiB minus the built-in 256 MiB reserve,
	// then again with the policy's own 128 MiB reserve.
	if len(e.policy.reqs) != 2 {
		t.Fatalf("%d admission requests, want 2: %+v", len(e.policy.reqs), e.policy.reqs)
	}
	r := e.policy.reqs[1]
	if r.Nodes != 2 || r.CPUs != 4 || r.MemPerNode != (1500-128)<<20 || r.User != "alice" || r.JobID != "42" || r.Image != "debian12" {
		t.Errorf("request = %+v", r)
	}
	p := e.booter.plans[0]
	if p.VM.CPUs != 4 || p.VM.MemBytes != (1500-128)<<20 || strings.Join(p.Nodes, ",") != "n1,n2" ||
		p.Cgroup.MemoryMax != 1500<<20 || p.StepID != "batch" || !strings.HasSuffix(p.RuntimeDir, "/42.batch") {
		t.Errorf("plan = %+v", p)
	}
	select {
	case <-e.booter.guest.stopped:
	default:
		t.Error("the VM was not stopped")
	}
	if _, err := os.Stat(p.RuntimeDir); err == nil {
		t.Error("runtime directory left behind")
	}
}

func TestUserWishesReachThePolicy(t *testing.T) {
	e := newEnv(t, []string{"true"}, false, Wish{Image: "debian12", Mem: "1GiB", CPUs: 3, CheckpointInterval: "30m"})
	if rc := e.run(t); rc != 0 {
		t.Fatalf("exit status %d; stderr: %s", rc, e.stderr)
	}
	r := e.policy.reqs[0]
	if len(e.policy.reqs) != 1 || r.CPUs != 3 || r.MemPerNode != 1<<30 || r.CheckpointInterval.Value.String() != "30m" {
		t.Errorf("requests = %+v", e.policy.reqs)
	}
}

func TestRefusedAtLaunch(t *testing.T) {
	e := newEnv(t, []string{"true"}, false, Wish{Image: "forbidden"})
	if rc := e.run(t); rc != ExitFailure {
		t.Fatalf("exit status %d, want %d", rc, ExitFailure)
	}
	if !strings.Contains(e.stderr.String(), "--vm-image=forbidden is denied") || len(e.booter.plans) != 0 {
		t.Errorf("stderr %q, %d boots", e.stderr, len(e.booter.plans))
	}
}

func TestMissingImage(t *testing.T) {
	e := newEnv(t, []string{"true"}, false, Wish{Image: "missing"})
	if rc := e.run(t); rc != ExitFailure || !strings.Contains(e.stderr.String(), "image not found") {
		t.Fatalf("exit status %d, stderr %q", rc, e.stderr)
	}
}

func TestOnlyTaskZeroRuns(t *testing.T) {
	e := newEnv(t, []string{"false"}, false, Wish{Image: "debian12"}, "SLURM_PROCID=1")
	if rc := e.run(t); rc != 0 || len(e.booter.plans) != 0 || len(e.policy.reqs) != 0 {
		t.Fatalf("task 1: exit %d, %d boots, %d requests", rc, len(e.booter.plans), len(e.policy.reqs))
	}
}

func TestSIGTERMForwardedToGuestCommand(t *testing.T) {
	e := newEnv(t, []string{"sh", "-c", "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.05; done"}, false, Wish{Image: "debian12"})
	go func() {
		for !strings.Contains(e.stdout.String(), "ready") {
			time.Sleep(10 * time.Millisecond)
		}
		e.signals <- syscall.SIGTERM
	}()
	if rc := e.run(t); rc != 9 {
		t.Fatalf("exit status %d, want the trap's 9; stderr %q", rc, e.stderr)
	}
	if !strings.Contains(e.stdout.String(), "got-term") {
		t.Errorf("stdout %q", e.stdout)
	}
}

// slowListener delays each connection it accepts by delay once set: a
// guest agent that is slow to accept (a guest spread over nodes).
type slowListener struct {
	net.Listener
	delay atomic.Int64 // nanoseconds
}

func (l *slowListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	time.Sleep(time.Duration(l.delay.Load()))
	return c, err
}

// TestSIGTERMForwardedToSlowAgent: an agent that takes 6 s to accept the
// signal's connection (longer than a single-node forward's 5 s) still gets
// SIGTERM within the grace, and the trap runs.
func TestSIGTERMForwardedToSlowAgent(t *testing.T) {
	e := newEnv(t, []string{"sh", "-c", "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.05; done"}, false, Wish{Image: "debian12"})
	e.l.Opts.TermGrace = 15 * time.Second
	e.booter.wrap = func(l net.Listener) net.Listener { return &slowListener{Listener: l} }
	go func() {
		for !strings.Contains(e.stdout.String(), "ready") {
			time.Sleep(10 * time.Millisecond)
		}
		e.booter.listener.(*slowListener).delay.Store(int64(6 * time.Second))
		e.signals <- syscall.SIGTERM
	}()
	if rc := e.run(t); rc != 9 {
		t.Fatalf("exit status %d, want the trap's 9; stderr %q", rc, e.stderr)
	}
	if !strings.Contains(e.stdout.String(), "got-term") {
		t.Errorf("stdout %q", e.stdout)
	}
}

func TestSIGTERMIgnoredStopsVMAfterGrace(t *testing.T) {
	e := newEnv(t, []string{"sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"}, false, Wish{Image: "debian12"})
	e.l.Opts.TermGrace = 200 * time.Millisecond
	go func() {
		for !strings.Contains(e.stdout.String(), "ready") {
			time.Sleep(10 * time.Millisecond)
		}
		e.signals <- syscall.SIGTERM
	}()
	if rc := e.run(t); rc != ExitTermed {
		t.Fatalf("exit status %d, want %d", rc, ExitTermed)
	}
	select {
	case <-e.booter.guest.stopped:
	default:
		t.Error("the VM was not stopped")
	}
}

func TestSIGTERMDuringBoot(t *testing.T) {
	e := newEnv(t, []string{"true"}, false, Wish{Image: "debian12"})
	e.booter.noBoot = true
	go func() {
		time.Sleep(100 * time.Millisecond)
		e.signals <- syscall.SIGTERM
	}()
	if rc := e.run(t); rc != 128+int(syscall.SIGTERM) {
		t.Fatalf("exit status %d, want 143; stderr %q", rc, e.stderr)
	}
	select {
	case <-e.booter.guest.stopped:
	default:
		t.Error("the VM was not stopped")
	}
}

func TestVMDiesDuringJob(t *testing.T) {
	e := newEnv(t, []string{"sh", "-c", "echo ready; sleep 30"}, false, Wish{Image: "debian12"})
	go func() {
		for !strings.Contains(e.stdout.String(), "ready") {
			time.Sleep(10 * time.Millisecond)
		}
		close(e.booter.guest.done)
	}()
	if rc := e.run(t); rc != ExitFailure || !strings.Contains(e.stderr.String(), "the VM stopped while the job ran: fake VM died") {
		t.Fatalf("exit status %d, stderr %q", rc, e.stderr)
	}
}

// TestVMDiesWithTheAgentConnection: when the VM stops (a slice died), the
// agent's connection ends too, often first; the error names the VM's end.
func TestVMDiesWithTheAgentConnection(t *testing.T) {
	e := newEnv(t, []string{"sh", "-c", "echo ready; sleep 30"}, false, Wish{Image: "debian12"})
	go func() {
		for !strings.Contains(e.stdout.String(), "ready") {
			time.Sleep(10 * time.Millisecond)
		}
		e.booter.guest.stopAgent()
		time.Sleep(200 * time.Millisecond)
		close(e.booter.guest.done)
	}()
	if rc := e.run(t); rc != ExitFailure || !strings.Contains(e.stderr.String(), "the VM stopped while the job ran: fake VM died") {
		t.Fatalf("exit status %d, stderr %q", rc, e.stderr)
	}
}

func TestRequestWithoutSlurmMemory(t *testing.T) {
	senv, _ := ParseEnv([]string{"SLURM_JOB_ID=1", "SLURM_JOB_NODELIST=n1", "SLURM_JOB_CPUS_PER_NODE=2"})
	req, err := Request(senv, Wish{Image: "x"}, 3600, builtinReserve)
	if err != nil || req.MemPerNode != 0 || req.CPUs != 2 || req.Walltime.String() != "1h" {
		t.Fatalf("Request = %+v, %v (want no memory: the policy's default applies)", req, err)
	}
	senv.MemPerNodeMiB = 200
	if _, err := Request(senv, Wish{Image: "x"}, 0, builtinReserve); err == nil || !strings.Contains(err.Error(), "too little") {
		t.Errorf("200 MiB per node: %v", err)
	}
	if _, err := Request(senv, Wish{Image: "x", Mem: "lots"}, 0, builtinReserve); err == nil || !strings.Contains(err.Error(), "--vm-mem=lots") {
		t.Errorf("bad --vm-mem: %v", err)
	}
}

func TestPlanRoundTrip(t *testing.T) {
	p := &Plan{JobID: "7", Cluster: "lab", StepID: "0", Nodes: []string{"n1"}, RuntimeDir: "/run/hpcvm/7.0", VMM: []string{"/bin/hpcvm", "vm", "run"},
		VM: VMSpec{Kernel: "/k", CPUs: 2, MemBytes: 1 << 30, AgentPort: 1024, DiskMode: DiskModeShared}}
	s, err := p.Encode()
	if err != nil {
		t.Fatal(err)
	}
	q, err := DecodePlan(s)
	if err != nil || q.VM.CPUs != 2 || q.VsockPath() != "/run/hpcvm/7.0/vsock.sock" || q.CgroupName(0) != "hpcvm-7.0-0-lab" {
		t.Fatalf("DecodePlan = %+v, %v", q, err)
	}
	if _, err := DecodePlan(`{"job_id":"7","extra":1}`); err == nil {
		t.Error("unknown field accepted")
	}
	if _, err := DecodePlan(`{"job_id":"7"}`); err == nil || !strings.Contains(err.Error(), "incomplete") {
		t.Errorf("incomplete plan: %v", err)
	}
}

func TestShapeSharedDiskMakesRootReadOnly(t *testing.T) {
	eff := &policies.Effective{VCPUs: 4, MemPerNode: 1<<30 + 12345}
	vm := Shape(eff, Image{Kernel: "/k", Cmdline: "root=/dev/vda rw console=ttyS0"}, "", DiskModeShared)
	if vm.Cmdline != "root=/dev/vda console=ttyS0 ro" || vm.MemBytes != 1<<30 || vm.CPUs != 4 {
		t.Errorf("Shape = %+v", vm)
	}
	vm = Shape(eff, Image{Kernel: "/k", Cmdline: "root=/dev/vda rw"}, "", DiskModeCopy)
	if vm.Cmdline != "root=/dev/vda rw" {
		t.Errorf("copy mode changed the cmdline: %q", vm.Cmdline)
	}
}

func TestSliceEnvDropsPluginOptions(t *testing.T) {
	got := SliceEnv([]string{"SLURM_JOB_ID=1", "_SLURM_SPANK_OPTION_hpcvm_vm_image=debian12",
		"SLURM_SPANK__SLURM_SPANK_OPTION_hpcvm_vm_mem=1G", "SPANK_X=1", "HPCVM_LAUNCH_INNER=0", "A=b"})
	if strings.Join(got, " ") != "SLURM_JOB_ID=1 A=b HPCVM_LAUNCH_INNER=1" {
		t.Errorf("SliceEnv = %v", got)
	}
}

func TestRemoveRuntimeDirStaysBelowRoot(t *testing.T) {
	root := t.TempDir()
	for _, bad := range []string{root, filepath.Dir(root), "/etc", filepath.Join(root, "..", "x")} {
		if err := removeRuntimeDir(root, bad); err == nil {
			t.Errorf("removeRuntimeDir(%q) allowed", bad)
		}
	}
	d := filepath.Join(root, "1.batch")
	os.MkdirAll(d, 0o700)
	if err := removeRuntimeDir(root, d); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d); err == nil {
		t.Error("not removed")
	}
}
