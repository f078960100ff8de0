package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hpcvm/hpcvm/images"
	"github.com/hpcvm/hpcvm/internal/units"
)

func init() {
	register("image", "build and manage OS images (hpcvm image build|list|inspect|verify|rm)", imageMain)
}

const imageUsage = `usage: hpcvm image COMMAND [options]

commands:
  build NAME|FILE   build an image from its TOML definition and publish it
  list              list the images in the store
  inspect NAME      print an image's manifest (JSON)
  verify NAME       recompute the sha256 of every artifact
  rm NAME           remove an image

The store is --store, else $HPCVM_IMAGE_STORE, else ` + images.DefaultStoreDir + `.
Run 'hpcvm image COMMAND --help' for a command's options.
`

func imageMain(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, imageUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmds := map[string]func([]string) int{
		"build": imageBuild, "list": imageList, "ls": imageList,
		"inspect": imageInspect, "verify": imageVerify, "rm": imageRm,
	}
	run, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "hpcvm image: unknown command %q (known: build, list, inspect, verify, rm)\n", args[0])
		return 2
	}
	return run(args[1:])
}

func imageErr(format string, a ...any) int {
	fmt.Fprintf(os.Stderr, "hpcvm image: "+format+"\n", a...)
	return 1
}

// imageFlags parses the options common to all image commands; wantArgs is
// the number of positional arguments.
func imageFlags(name, argsUsage string, wantArgs int, args []string, extra func(*flag.FlagSet)) (*flag.FlagSet, *images.Store, int) {
	fs := flag.NewFlagSet("hpcvm image "+name, flag.ContinueOnError)
	defStore := os.Getenv("HPCVM_IMAGE_STORE")
	if defStore == "" {
		defStore = images.DefaultStoreDir
	}
	store := fs.String("store", defStore, "image store `DIR` (env HPCVM_IMAGE_STORE)")
	if extra != nil {
		extra(fs)
	}
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: hpcvm image %s [options] %s\n\noptions:\n", name, argsUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, nil, 0
		}
		return nil, nil, 2
	}
	if fs.NArg() != wantArgs {
		fs.Usage()
		return nil, nil, 2
	}
	s, err := images.OpenStore(*store)
	if err != nil {
		return nil, nil, imageErr("%v", err)
	}
	return fs, s, -1
}

func imageList(args []string) int {
	_, s, rc := imageFlags("list", "", 0, args, nil)
	if rc >= 0 {
		return rc
	}
	ms, err := s.List()
	if err != nil {
		return imageErr("%v", err)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tVERSION\tBASE\tKERNEL\tDISK\tCREATED")
	for _, m := range ms {
		disk := "-"
		if a, ok := m.Artifact(images.DiskFile); ok {
			disk = fmt.Sprintf("%s (%s used)", units.FormatSize(uint64(a.Size)), humanSize(a.Blocks))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.Version, m.Base, m.KernelVersion, disk, m.Created.Local().Format(time.DateTime))
	}
	tw.Flush()
	return 0
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
}

func imageInspect(args []string) int {
	fs, s, rc := imageFlags("inspect", "NAME", 1, args, nil)
	if rc >= 0 {
		return rc
	}
	m, err := s.Get(fs.Arg(0))
	if err != nil {
		return imageErr("%v", err)
	}
	// Paths make the output directly usable for hpcvm vm run.
	out := struct {
		*images.Manifest
		Dir    string `json:"dir"`
		Disk   string `json:"disk"`
		Kernel string `json:"kernel"`
		Initrd string `json:"initrd"`
	}{m, s.Path(m.Name, ""), s.Path(m.Name, images.DiskFile), s.Path(m.Name, images.KernelFile), s.Path(m.Name, images.InitrdFile)}
	b, _ := json.MarshalIndent(out, "", "  ")
	fmt.Println(string(b))
	return 0
}

func imageVerify(args []string) int {
	fs, s, rc := imageFlags("verify", "NAME", 1, args, nil)
	if rc >= 0 {
		return rc
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := s.Verify(ctx, fs.Arg(0))
	for _, r := range res {
		status := "ok"
		if !r.OK() {
			status = "MISMATCH"
			if r.Err != nil {
				status = "ERROR: " + r.Err.Error()
			}
		}
		fmt.Printf("%-12s %s  %s\n", r.Artifact.Name, r.Artifact.SHA256[:16], status)
	}
	if err != nil {
		return imageErr("%v", err)
	}
	fmt.Printf("%s: all %d artifacts match the manifest\n", fs.Arg(0), len(res))
	return 0
}

func imageRm(args []string) int {
	fs, s, rc := imageFlags("rm", "NAME", 1, args, nil)
	if rc >= 0 {
		return rc
	}
	if err := s.Remove(fs.Arg(0)); err != nil {
		return imageErr("%v", err)
	}
	return 0
}

func imageBuild(args []string) int {
	var agent, cache, defsDir string
	var force, verbose bool
	fs, s, rc := imageFlags("build", "NAME|FILE", 1, args, func(fs *flag.FlagSet) {
		fs.StringVar(&agent, "agent", os.Getenv("HPCVM_AGENT"), "static hpcvm-agent `BINARY` to install (env HPCVM_AGENT; default: hpcvm-agent next to this hpcvm, else built from the source tree with go build)")
		fs.StringVar(&cache, "cache", defaultImageCache(), "`DIR` for downloaded packages (empty: no cache)")
		fs.StringVar(&defsDir, "defs", os.Getenv("HPCVM_IMAGE_DEFS"), "`DIR` of image definitions for NAME (env HPCVM_IMAGE_DEFS; default: ./images, then next to this hpcvm)")
		fs.BoolVar(&force, "force", false, "rebuild even if the store has this build already")
		fs.BoolVar(&verbose, "v", false, "debug logging")
	})
	if rc >= 0 {
		return rc
	}
	defFile, err := findDefinition(fs.Arg(0), defsDir)
	if err != nil {
		return imageErr("%v", err)
	}
	def, err := images.ParseFile(defFile)
	if err != nil {
		return imageErr("%v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	tty := isTerminal(os.Stderr)
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	var logOut io.Writer = os.Stderr
	var prog *progressLine
	if tty {
		prog = &progressLine{w: os.Stderr, start: time.Now()}
		logOut = prog // log lines clear the status line first
	}
	log := slog.New(slog.NewTextHandler(logOut, &slog.HandlerOptions{Level: level}))
	if agent == "" {
		if agent, err = findOrBuildAgent(ctx, log, cache); err != nil {
			return imageErr("%v", err)
		}
	}
	b := &images.Builder{Store: s, Logger: log, Agent: agent, CacheDir: cache}
	if tty {
		b.Progress = prog
		b.ProgressInterval = time.Second
	} else {
		b.Progress = &progressLog{log: log}
		b.ProgressInterval = 30 * time.Second
	}
	m, cached, err := b.Build(ctx, def, images.BuildOptions{Force: force})
	if prog != nil {
		prog.clear()
	}
	if err != nil {
		return imageErr("%v", err)
	}
	if cached {
		fmt.Printf("%s is up to date (build key %s); use --force to rebuild\n", m.Name, m.BuildKey[:12])
		return 0
	}
	fmt.Printf("built %s %s (kernel %s) in %s: %s\n", m.Name, m.Version, m.KernelVersion, time.Duration(m.BuildSeconds*float64(time.Second)), s.Path(m.Name, ""))
	return 0
}

func defaultImageCache() string {
	if c := os.Getenv("HPCVM_CACHE"); c != "" {
		return filepath.Join(c, "images")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "hpcvm", "images")
	}
	return ""
}

// findDefinition resolves NAME to NAME.toml in the definitions directory;
// an argument with a slash or a .toml suffix is a file.
func findDefinition(arg, defsDir string) (string, error) {
	if strings.Contains(arg, "/") || strings.HasSuffix(arg, ".toml") {
		return arg, nil
	}
	if !images.ValidName(arg) {
		return "", fmt.Errorf("%q is neither an image name nor a .toml file", arg)
	}
	var dirs []string
	if defsDir != "" {
		dirs = []string{defsDir}
	} else {
		dirs = []string{"images"}
		if exe, err := os.Executable(); err == nil {
			dirs = append(dirs, filepath.Join(filepath.Dir(exe), "..", "images"), filepath.Join(filepath.Dir(exe), "..", "share", "hpcvm", "images"))
		}
	}
	for _, d := range dirs {
		p := filepath.Join(d, arg+".toml")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("no definition %s.toml in %s", arg, strings.Join(dirs, ", "))
}

// findOrBuildAgent uses hpcvm-agent next to this executable, or builds it
// from the source tree (a go.mod of this module in . or above).
func findOrBuildAgent(ctx context.Context, log *slog.Logger, cache string) (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "hpcvm-agent")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	root, err := findModuleRoot()
	if err != nil {
		return "", fmt.Errorf("no hpcvm-agent binary: give --agent, or run in the hpcvm source tree (%v)", err)
	}
	dir := cache
	if dir == "" {
		dir = os.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	out := filepath.Join(dir, "hpcvm-agent")
	log.Info("building the guest agent", "source", root, "out", out)
	return out, buildAgent(ctx, root, out)
}

// buildAgent builds the static agent reproducibly, as `make agent` does: no
// VCS stamp, no paths, and a version label that changes only with
// guest/agent, so that a commit elsewhere leaves the agent's sha256, and the
// image build key, unchanged.
func buildAgent(ctx context.Context, root, out string) error {
	v, err := exec.CommandContext(ctx, "sh", filepath.Join(root, "guest", "agent", "version.sh")).Output()
	if err != nil {
		return fmt.Errorf("guest/agent/version.sh: %v", err)
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-X main.version="+strings.TrimSpace(string(v)), "-o", out, "./guest/agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./guest/agent: %v\n%s", err, b)
	}
	return nil
}

func findModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/hpcvm/hpcvm\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod of github.com/hpcvm/hpcvm in the current directory or above")
		}
		dir = parent
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progressLine keeps one status line ("[2/6] debootstrap 143.2 MiB 1m02s")
// at the bottom of a terminal; log lines written through it clear it first.
type progressLine struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
	stage string
	bytes int64
	shown bool
}

func (p *progressLine) Stage(i, n int, name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stage = fmt.Sprintf("[%d/%d] %s", i, n, name)
	p.bytes = 0
	p.draw()
}

func (p *progressLine) Bytes(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.bytes = n
	p.draw()
}

func (p *progressLine) draw() {
	size := ""
	if p.bytes > 0 {
		size = " " + humanSize(p.bytes)
	}
	fmt.Fprintf(p.w, "\r\033[K%s%s  %s", p.stage, size, time.Since(p.start).Round(time.Second))
	p.shown = true
}

func (p *progressLine) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
	}
	n, err := p.w.Write(b)
	if p.stage != "" {
		p.draw()
	}
	return n, err
}

func (p *progressLine) clear() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
		p.shown = false
	}
}

// progressLog reports progress as plain log lines (not a terminal).
type progressLog struct {
	log   *slog.Logger
	stage string
}

func (p *progressLog) Stage(i, n int, name string) { p.stage = name }
func (p *progressLog) Bytes(n int64) {
	p.log.Info("build progress", "stage", p.stage, "bytes", n, "size", humanSize(n))
}
