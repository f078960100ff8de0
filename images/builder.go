package images

import (
	"context"
	"crypto/sha256"
	"debug/buildinfo"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Progress receives a build's progress. The CLI draws a status line on a
// terminal and writes plain log lines otherwise.
type Progress interface {
	// Stage is called when stage i (1-based) of n starts.
	Stage(i, n int, name string)
	// Bytes reports the size of what the current stage has produced so far
	// (the root filesystem tree, then the disk image).
	Bytes(n int64)
}

// BuildEnv is what a stage works with.
type BuildEnv struct {
	Def      *Definition
	Dir      string    // staging directory: artifacts go here
	Rootfs   string    // Dir/rootfs: the image's root filesystem tree
	Log      io.Writer // build.log (external commands' output)
	Logger   *slog.Logger
	Manifest *Manifest // stages fill in kernel version etc.
	Agent    string    // static hpcvm-agent binary to install
	CacheDir string    // debootstrap package cache ("" for none)
}

// Stage is one named step of a build; Builder.Stages can be inspected,
// reordered or replaced (tests use fake stages).
type Stage struct {
	Name string
	Run  func(ctx context.Context, env *BuildEnv) error
}

// Builder builds images from definitions into a Store.
type Builder struct {
	Store    *Store
	Logger   *slog.Logger // nil: slog.Default()
	Progress Progress     // nil: none
	// Agent is the static hpcvm-agent binary put into images. Its sha256 is
	// part of the cache key, so a new agent means a new image: build it
	// reproducibly (make agent) or every commit rebuilds every image.
	Agent    string
	CacheDir string  // debootstrap's package cache; "" disables it
	Stages   []Stage // nil: DefaultStages()
	// ProgressInterval is how often Bytes is measured; default 2s.
	ProgressInterval time.Duration
}

// BuildOptions modify one build.
type BuildOptions struct {
	Force bool // rebuild even if an image with the same build key exists
}

// BuilderVersion changes whenever DefaultStages would build a different
// image from the same definition (base packages, files, steps), so images
// built by an older builder are rebuilt rather than served from cache.
const BuilderVersion = 3

// BuildKey is the cache key of a build: the builder version, the
// definition's hash and the agent binary's sha256.
func BuildKey(defHash, agentSHA string) string {
	h := sha256.Sum256([]byte(fmt.Sprintf("hpcvm-image-builder-%d\x00%s\x00%s", BuilderVersion, defHash, agentSHA)))
	return hex.EncodeToString(h[:])
}

// Build builds def and publishes it in the store. If an image of that name
// with the same build key exists, it is returned with cached = true. An
// interrupted or failed build leaves the store as it was.
func (b *Builder) Build(ctx context.Context, def *Definition, opts BuildOptions) (m *Manifest, cached bool, err error) {
	log := b.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("image", def.Name)
	defHash, err := def.Hash()
	if err != nil {
		return nil, false, err
	}
	agentSHA, err := checkAgent(b.Agent)
	if err != nil {
		return nil, false, err
	}
	if stampedAgent(b.Agent) {
		log.Warn("the agent binary has a VCS stamp, so every commit changes it and rebuilds the image; build it with make agent (go build -trimpath -buildvcs=false)", "agent", b.Agent)
	}
	key := BuildKey(defHash, agentSHA)
	if old, err := b.Store.Get(def.Name); err == nil && old.BuildKey == key && !opts.Force {
		log.Info("image up to date (same definition and agent)", "build_key", key[:12])
		return old, true, nil
	}

	st, err := b.Store.Begin(def.Name)
	if err != nil {
		return nil, false, err
	}
	defer func() {
		if err != nil {
			if aerr := st.Abort(); aerr != nil {
				log.Error("removing the failed build", "dir", st.Dir(), "err", aerr)
			}
		}
	}()
	logFile, err := os.Create(filepath.Join(st.Dir(), BuildLogFile))
	if err != nil {
		return nil, false, err
	}
	defer logFile.Close()

	start := time.Now()
	m = &Manifest{
		Name: def.Name, Version: def.Version, Description: def.Description,
		DefinitionHash: defHash, BuildKey: key, AgentSHA256: agentSHA,
		Cmdline: def.Kernel.Cmdline, Base: def.Base.Distribution + " " + def.Base.Suite,
		KernelPackage: def.Kernel.Package, AgentPort: def.Agent.Port,
	}
	env := &BuildEnv{
		Def: def, Dir: st.Dir(), Rootfs: filepath.Join(st.Dir(), "rootfs"),
		Log: logFile, Logger: log, Manifest: m, Agent: b.Agent, CacheDir: b.CacheDir,
	}
	stages := b.Stages
	if stages == nil {
		stages = DefaultStages()
	}
	for i, s := range stages {
		if err := ctx.Err(); err != nil {
			return nil, false, err
		}
		log.Info("build stage", "stage", s.Name, "step", fmt.Sprintf("%d/%d", i+1, len(stages)))
		if b.Progress != nil {
			b.Progress.Stage(i+1, len(stages), s.Name)
		}
		stop := b.watch(env)
		t0 := time.Now()
		err := s.Run(ctx, env)
		stop()
		if err != nil {
			if ctx.Err() != nil {
				return nil, false, fmt.Errorf("build %s interrupted in stage %s: %w", def.Name, s.Name, ctx.Err())
			}
			return nil, false, fmt.Errorf("build %s: stage %s: %w%s", def.Name, s.Name, err, logTail(logFile.Name(), 20))
		}
		fmt.Fprintf(logFile, "== stage %s done in %s\n", s.Name, time.Since(t0).Round(time.Millisecond))
	}
	// The tree went into disk.raw; it must not be published with it.
	if err := safeRemoveAll(env.Rootfs); err != nil {
		return nil, false, err
	}
	m.Created = time.Now().UTC()
	m.BuildSeconds = time.Since(start).Round(time.Second).Seconds()
	if err := st.Commit(ctx, m, DiskFile, KernelFile, InitrdFile); err != nil {
		return nil, false, err
	}
	log.Info("image published", "dir", b.Store.Path(def.Name, ""), "seconds", m.BuildSeconds)
	return m, false, nil
}

// watch reports the staging directory's allocated size every interval
// until stopped.
func (b *Builder) watch(env *BuildEnv) (stop func()) {
	if b.Progress == nil {
		return func() {}
	}
	iv := b.ProgressInterval
	if iv == 0 {
		iv = 2 * time.Second
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(iv)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				b.Progress.Bytes(diskUsage(env.Dir))
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// diskUsage is the bytes allocated under dir (like du), not following
// symlinks or crossing into mounted filesystems.
func diskUsage(dir string) int64 {
	var total int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return total
}

// logTail returns the last n lines of a build log for an error message.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return fmt.Sprintf("\nlast lines of %s:\n  %s", path, strings.Join(lines, "\n  "))
}

// checkAgent checks that path is a static x86-64 ELF executable and returns
// its sha256: a dynamically linked agent would not run in every image.
func checkAgent(path string) (string, error) {
	if path == "" {
		return "", errors.New("no hpcvm-agent binary given (build one with: CGO_ENABLED=0 go build -o bin/hpcvm-agent ./guest/agent)")
	}
	f, err := elf.Open(path)
	if err != nil {
		return "", fmt.Errorf("agent %s: %w", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return "", fmt.Errorf("agent %s: machine %v, want x86-64", path, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "", fmt.Errorf("agent %s is dynamically linked: build it with CGO_ENABLED=0", path)
		}
	}
	sum, _, err := fileSHA256(context.Background(), path)
	return sum, err
}

// stampedAgent says whether the agent was built with Go's VCS stamping.
func stampedAgent(path string) bool {
	bi, err := buildinfo.ReadFile(path)
	if err != nil {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			return true
		}
	}
	return false
}

// runCmd runs a host command with its output appended to the build log. It
// runs in its own process group (killed as a whole on cancellation) and
// gets SIGKILL if the builder dies (Pdeathsig).
//
// With isolate (needs root) it also runs in new PID and mount namespaces,
// under a shell that stays PID 1 there: mounts made inside vanish when the
// namespace ends, and when that shell dies - cancellation, or Pdeathsig
// after the builder was SIGKILLed - the kernel kills every process in the
// namespace. Pdeathsig alone is not enough: it is cleared in a process that
// changes its credentials, which apt and dpkg do, so they would outlive a
// killed builder and keep writing into a build directory being removed.
func runCmd(ctx context.Context, env *BuildEnv, isolate bool, display string, argv ...string) error {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout = env.Log
	cmd.Stderr = env.Log
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LC_ALL=C", "LANG=C", "HOME=/root", "DEBIAN_FRONTEND=noninteractive",
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if isolate {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWPID
		// Unshareflags, not Cloneflags: then Go also makes / recursively
		// private in the child, so no mount propagates to the host.
		cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS
	}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	if display == "" {
		display = strings.Join(argv, " ")
	}
	fmt.Fprintf(env.Log, "+ %s\n", display)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w", display, err)
	}
	return nil
}

// chrootScript mounts /proc, /sys and /dev into the tree and runs the
// command chrooted. It runs isolated (runCmd), so the kernel tears the
// mounts down when it exits, however it exits. No exec and a trailing exit:
// the shell must stay PID 1 of the namespace (see runCmd).
const chrootScript = `set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
chroot "$root" "$@"
exit $?`

// pid1Script runs a command under a shell that stays PID 1 (see runCmd).
const pid1Script = `"$@"
exit $?`

// Chroot runs argv inside the image's root filesystem.
func (env *BuildEnv) Chroot(ctx context.Context, argv ...string) error {
	return runCmd(ctx, env, true, "chroot "+strings.Join(argv, " "), append([]string{"/bin/sh", "-c", chrootScript, "sh", env.Rootfs}, argv...)...)
}

// Run runs a host command, its output going to the build log.
func (env *BuildEnv) Run(ctx context.Context, argv ...string) error {
	return runCmd(ctx, env, false, "", argv...)
}
