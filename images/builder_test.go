package images

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// writeELF writes a minimal x86-64 ELF executable with one PT_LOAD and,
// if interp, a PT_INTERP program header (what a dynamic binary has).
func writeELF(t *testing.T, path string, interp bool) {
	t.Helper()
	phnum := 1
	if interp {
		phnum = 2
	}
	b := make([]byte, 64+56*phnum)
	copy(b, "\x7fELF\x02\x01\x01")
	le := binary.LittleEndian
	le.PutUint16(b[16:], 2)  // ET_EXEC
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)  // EV_CURRENT
	le.PutUint64(b[32:], 64) // e_phoff
	le.PutUint16(b[52:], 64) // e_ehsize
	le.PutUint16(b[54:], 56) // e_phentsize
	le.PutUint16(b[56:], uint16(phnum))
	le.PutUint32(b[64:], 1) // PT_LOAD
	if interp {
		le.PutUint32(b[64+56:], 3) // PT_INTERP
	}
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func testDef(t *testing.T) *Definition {
	t.Helper()
	d, err := Parse("test.toml", []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// fakeStages produce the three artifacts without debootstrap.
func fakeStages(runs *int) []Stage {
	return []Stage{
		{"fake-rootfs", func(ctx context.Context, env *BuildEnv) error {
			*runs++
			return os.MkdirAll(filepath.Join(env.Rootfs, "etc"), 0o755)
		}},
		{"fake-artifacts", func(ctx context.Context, env *BuildEnv) error {
			env.Manifest.KernelVersion = "6.1.0-test"
			for _, a := range []string{DiskFile, KernelFile, InitrdFile} {
				if err := os.WriteFile(filepath.Join(env.Dir, a), []byte("fake "+a), 0o644); err != nil {
					return err
				}
			}
			return nil
		}},
	}
}

type recProgress struct {
	mu     sync.Mutex
	stages []string
}

func (p *recProgress) Stage(i, n int, name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stages = append(p.stages, fmt.Sprintf("%d/%d %s", i, n, name))
}
func (p *recProgress) Bytes(int64) {}

func newTestBuilder(t *testing.T, stages []Stage) *Builder {
	t.Helper()
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	agent := filepath.Join(t.TempDir(), "hpcvm-agent")
	writeELF(t, agent, false)
	return &Builder{Store: s, Agent: agent, Stages: stages, ProgressInterval: time.Millisecond}
}

func TestBuildPublishesAndCaches(t *testing.T) {
	runs := 0
	b := newTestBuilder(t, fakeStages(&runs))
	p := &recProgress{}
	b.Progress = p
	def := testDef(t)
	m, cached, err := b.Build(context.Background(), def, BuildOptions{})
	if err != nil || cached {
		t.Fatalf("Build: %v cached=%v", err, cached)
	}
	if m.KernelVersion != "6.1.0-test" || m.Cmdline != def.Kernel.Cmdline || m.AgentPort != 1024 || len(m.Artifacts) != 3 {
		t.Fatalf("manifest %+v", m)
	}
	if strings.Join(p.stages, ",") != "1/2 fake-rootfs,2/2 fake-artifacts" {
		t.Fatalf("progress stages %v", p.stages)
	}
	if _, err := os.Stat(b.Store.Path(def.Name, "rootfs")); !os.IsNotExist(err) {
		t.Fatalf("rootfs published with the image: %v", err)
	}
	if _, err := os.Stat(b.Store.Path(def.Name, BuildLogFile)); err != nil {
		t.Fatalf("no build log: %v", err)
	}
	if _, err := b.Store.Verify(context.Background(), def.Name); err != nil {
		t.Fatal(err)
	}
	// Same definition and agent: cached, no stage runs.
	_, cached, err = b.Build(context.Background(), def, BuildOptions{})
	if err != nil || !cached || runs != 1 {
		t.Fatalf("second Build: %v cached=%v runs=%d", err, cached, runs)
	}
	// Force, or a changed definition, rebuilds.
	if _, cached, err = b.Build(context.Background(), def, BuildOptions{Force: true}); err != nil || cached || runs != 2 {
		t.Fatalf("forced Build: %v cached=%v runs=%d", err, cached, runs)
	}
	def.Packages = append(def.Packages, "hpcc")
	if _, cached, err = b.Build(context.Background(), def, BuildOptions{}); err != nil || cached || runs != 3 {
		t.Fatalf("Build of a changed definition: %v cached=%v runs=%d", err, cached, runs)
	}
	// The same agent bytes under another path: cached (the key is the
	// content, not the file); other agent bytes: rebuilt.
	agent, _ := os.ReadFile(b.Agent)
	b.Agent = filepath.Join(t.TempDir(), "hpcvm-agent")
	if err := os.WriteFile(b.Agent, agent, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, cached, err = b.Build(context.Background(), def, BuildOptions{}); err != nil || !cached || runs != 3 {
		t.Fatalf("Build with a copy of the agent: %v cached=%v runs=%d", err, cached, runs)
	}
	if err := os.WriteFile(b.Agent, append(agent, 0), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, cached, err = b.Build(context.Background(), def, BuildOptions{}); err != nil || cached || runs != 4 {
		t.Fatalf("Build with a changed agent: %v cached=%v runs=%d", err, cached, runs)
	}
}

func TestBuildKey(t *testing.T) {
	def := testDef(t)
	h1, err := def.Hash()
	if err != nil {
		t.Fatal(err)
	}
	// The same definition parsed again, with other comments and layout.
	again, err := Parse("other.toml", []byte("# a comment\n\n"+minimal))
	if err != nil {
		t.Fatal(err)
	}
	h2, err := again.Hash()
	if err != nil {
		t.Fatal(err)
	}
	def.Packages = append(def.Packages, "hpcc")
	h3, err := def.Hash()
	if err != nil {
		t.Fatal(err)
	}
	agentA, agentB := strings.Repeat("a", 64), strings.Repeat("b", 64)
	k := BuildKey(h1, agentA)
	if len(k) != 64 || BuildKey(h1, agentA) != k || BuildKey(h2, agentA) != k {
		t.Errorf("same definition and agent: keys %s, %s, %s", k, BuildKey(h1, agentA), BuildKey(h2, agentA))
	}
	if BuildKey(h3, agentA) == k {
		t.Error("changed definition, same key")
	}
	if BuildKey(h1, agentB) == k {
		t.Error("changed agent, same key")
	}
}

func TestBuildRejectsDynamicAgent(t *testing.T) {
	runs := 0
	b := newTestBuilder(t, fakeStages(&runs))
	writeELF(t, b.Agent, true)
	_, _, err := b.Build(context.Background(), testDef(t), BuildOptions{})
	if err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Fatalf("Build with a dynamic agent: %v", err)
	}
	os.WriteFile(b.Agent, []byte("#!/bin/sh\n"), 0o755)
	if _, _, err := b.Build(context.Background(), testDef(t), BuildOptions{}); err == nil {
		t.Fatal("Build with a shell script as agent succeeded")
	}
}

func TestBuildFailureLeavesStore(t *testing.T) {
	runs := 0
	stages := append(fakeStages(&runs), Stage{"boom", func(ctx context.Context, env *BuildEnv) error {
		return env.Run(ctx, "sh", "-c", "echo something went wrong; exit 4")
	}})
	b := newTestBuilder(t, stages)
	_, _, err := b.Build(context.Background(), testDef(t), BuildOptions{})
	if err == nil || !strings.Contains(err.Error(), "stage boom") || !strings.Contains(err.Error(), "something went wrong") {
		t.Fatalf("Build error %v, want the stage name and the log tail", err)
	}
	if got := storeEntries(t, b.Store); len(got) != 0 {
		t.Fatalf("store holds %v after a failed build", got)
	}
}

// TestBuildInterrupted cancels a build in the middle of a slow stage (as
// SIGINT does in the CLI): the previous image must stay as it was.
func TestBuildInterrupted(t *testing.T) {
	runs := 0
	b := newTestBuilder(t, fakeStages(&runs))
	def := testDef(t)
	old, _, err := b.Build(context.Background(), def, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	b.Stages = append(fakeStages(&runs)[:1], Stage{"slow", func(ctx context.Context, env *BuildEnv) error {
		os.WriteFile(filepath.Join(env.Dir, DiskFile), []byte("half"), 0o644)
		close(started)
		// A real external command, as debootstrap would be.
		return env.Run(ctx, "sleep", "600")
	}})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-started; cancel() }()
	_, _, err = b.Build(ctx, def, BuildOptions{Force: true})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted Build: %v, want context.Canceled", err)
	}
	m, err := b.Store.Get(def.Name)
	if err != nil || m.BuildKey != old.BuildKey || !m.Created.Equal(old.Created) {
		t.Fatalf("image after interruption: %v %+v", err, m)
	}
	if _, err := b.Store.Verify(context.Background(), def.Name); err != nil {
		t.Fatalf("old image damaged: %v", err)
	}
	if got := storeEntries(t, b.Store); len(got) != 1 {
		t.Fatalf("store holds %v after an interrupted build", got)
	}
}

// TestBuildKilled SIGKILLs a process in the middle of a build: nothing can
// clean up, yet the name still holds the old image, and the next build of
// that name removes the leftovers.
func TestBuildKilled(t *testing.T) {
	if os.Getenv("HPCVM_TEST_KILLED_BUILD_STORE") != "" {
		killedBuildHelper()
		return
	}
	runs := 0
	b := newTestBuilder(t, fakeStages(&runs))
	def := testDef(t)
	old, _, err := b.Build(context.Background(), def, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command(os.Args[0], "-test.run=^TestBuildKilled$")
	cmd.Env = append(os.Environ(), "HPCVM_TEST_KILLED_BUILD_STORE="+b.Store.Dir, "HPCVM_TEST_READY="+ready, "HPCVM_TEST_AGENT="+b.Agent)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	for i := 0; ; i++ {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if i > 6000 {
			t.Fatal("helper build never reached its slow stage")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	m, err := b.Store.Get(def.Name)
	if err != nil || m.BuildKey != old.BuildKey {
		t.Fatalf("image after SIGKILL: %v %+v", err, m)
	}
	if _, err := b.Store.Verify(context.Background(), def.Name); err != nil {
		t.Fatalf("old image damaged: %v", err)
	}
	var leftovers int
	for _, e := range storeEntries(t, b.Store) {
		if strings.HasPrefix(e, ".tmp-") {
			leftovers++
		}
	}
	if leftovers != 1 {
		t.Fatalf("want the killed build's temporary dir in the store, found %d", leftovers)
	}
	if _, _, err := b.Build(context.Background(), def, BuildOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if got := storeEntries(t, b.Store); len(got) != 1 {
		t.Fatalf("store holds %v after the next build, want only the image", got)
	}
}

func killedBuildHelper() {
	s, err := OpenStore(os.Getenv("HPCVM_TEST_KILLED_BUILD_STORE"))
	if err != nil {
		panic(err)
	}
	runs := 0
	def, _ := Parse("test.toml", []byte(minimal))
	b := &Builder{Store: s, Agent: os.Getenv("HPCVM_TEST_AGENT"), Stages: append(fakeStages(&runs), Stage{"hang", func(ctx context.Context, env *BuildEnv) error {
		os.WriteFile(os.Getenv("HPCVM_TEST_READY"), nil, 0o644)
		select {}
	}})}
	b.Build(context.Background(), def, BuildOptions{Force: true})
}

// TestIsolatedCommandsDieWithBuilder SIGKILLs a process running an isolated
// command whose own child (a grandchild, which Pdeathsig does not cover)
// must die too: the PID namespace takes it down.
func TestIsolatedCommandsDieWithBuilder(t *testing.T) {
	if os.Getenv("HPCVM_TEST_ISOLATE_HELPER") != "" {
		env := &BuildEnv{Log: os.Stderr}
		runCmd(context.Background(), env, true, "", "/bin/sh", "-c", pid1Script, "sh", "sh", "-c", "sleep 987654 & wait")
		return
	}
	if os.Getuid() != 0 {
		t.Skip("isolated commands need root (PID and mount namespaces)")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestIsolatedCommandsDieWithBuilder$")
	cmd.Env = append(os.Environ(), "HPCVM_TEST_ISOLATE_HELPER=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var pid int
	for i := 0; pid == 0; i++ {
		if i > 6000 {
			t.Fatal("the grandchild never started")
		}
		pid = findProc("sleep\x00987654\x00")
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	for i := 0; findProc("sleep\x00987654\x00") != 0; i++ {
		if i > 6000 {
			t.Fatalf("grandchild %d outlived the killed builder", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// findProc returns the pid of a live (not zombie) process with this
// cmdline, or 0.
func findProc(cmdline string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || string(b) != cmdline {
			continue
		}
		st, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if strings.Contains(string(st), ") Z ") {
			continue
		}
		return pid
	}
	return 0
}
