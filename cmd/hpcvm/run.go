package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/client"
	"github.com/hpcvm/hpcvm/images"
	"github.com/hpcvm/hpcvm/internal/units"
	"github.com/hpcvm/hpcvm/vmm/imagevm"
)

func init() {
	register("run", "run a command inside an OS image (hpcvm run --image NAME -- CMD ...)", runMain)
}

// envFlags collects repeated --env KEY=VALUE.
type envFlags []string

func (e *envFlags) String() string { return strings.Join(*e, ",") }
func (e *envFlags) Set(v string) error {
	if k, _, ok := strings.Cut(v, "="); !ok || k == "" {
		return fmt.Errorf("%q: want KEY=VALUE", v)
	}
	*e = append(*e, v)
	return nil
}

// forwardedSignals are passed to the command in the guest, as a shell
// passes them to its foreground job.
var forwardedSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

func runMain(args []string) int {
	fs := flag.NewFlagSet("hpcvm run", flag.ContinueOnError)
	image := fs.String("image", "debian12", "image `NAME` in the store")
	store := fs.String("store", envOr("HPCVM_IMAGE_STORE", images.DefaultStoreDir), "image store `DIR`")
	cpus := fs.Int("cpus", 1, "vCPUs")
	mem := fs.String("mem", "1GiB", "guest memory `SIZE`")
	workdir := fs.String("workdir", "/", "working `DIR` of the command in the guest")
	var env envFlags
	fs.Var(&env, "env", "set `KEY=VALUE` in the command's environment (repeatable)")
	asRoot := fs.Bool("root", false, "run as root in the guest instead of the calling user's uid/gid")
	console := fs.String("console", "", "copy the guest console to `FILE`")
	verify := fs.Bool("verify", true, "verify the image's checksums before booting")
	bootTimeout := fs.String("boot-timeout", units.FormatDuration(imagevm.DefaultBootTimeout), "give up if the guest agent does not answer within `DURATION` (e.g. 30m, 1h30m)")
	verbose := fs.Bool("v", false, "log VMM events and boot time to stderr")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: hpcvm run --image NAME [--cpus N] [--mem SIZE] [--env K=V]... [--workdir DIR] [--boot-timeout DURATION] -- CMD [ARGS...]\n\n"+
			"Boots the image as a VM on this node, runs CMD inside it as the calling user, streams its stdout and\n"+
			"stderr, forwards signals, and exits with CMD's status (128+N when killed by signal N).\n\noptions:\n")
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	argv := fs.Args()
	if len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "hpcvm run: no command given (usage: hpcvm run --image NAME -- CMD [ARGS...])")
		return 2
	}
	memBytes, err := units.ParseSize(*mem)
	if err != nil {
		return fail("--mem: %v", err)
	}
	boot, err := units.ParseDuration(*bootTimeout)
	if err != nil {
		return fail("--boot-timeout: %v", err)
	}
	if boot == 0 {
		return fail("--boot-timeout 0: must be more than 0")
	}
	if !strings.HasPrefix(*workdir, "/") {
		return fail("--workdir %q: must be an absolute path in the guest", *workdir)
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	st, err := images.OpenStore(*store)
	if err != nil {
		return fail("%v", err)
	}
	cfg := imagevm.Config{Store: st, Image: *image, CPUs: *cpus, MemBytes: memBytes, Verify: *verify, Logger: logger, ExtraCmdline: "quiet", BootTimeout: boot}
	if *console != "" {
		f, err := os.Create(*console)
		if err != nil {
			return fail("--console: %v", err)
		}
		defer f.Close()
		cfg.Console = f
	}

	// Signals that arrive while booting cancel the boot; afterwards they
	// are forwarded to the command.
	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, forwardedSignals...)
	defer signal.Stop(sigc)
	bootCtx, cancelBoot := context.WithCancel(context.Background())
	go func() {
		select {
		case <-sigc:
			cancelBoot()
		case <-bootCtx.Done():
		}
	}()
	vm, err := imagevm.Start(bootCtx, cfg)
	if err != nil {
		cancelBoot()
		return fail("%v", err)
	}
	cancelBoot()
	defer vm.Close()
	logger.Info("guest agent ready", "image", *image, "boot", vm.BootTime)

	cmd := client.Command{
		Argv:  argv,
		Env:   append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=" + envOr("TERM", "dumb")}, env...),
		Dir:   *workdir,
		Stdin: os.Stdin,
	}
	if !*asRoot {
		groups, _ := os.Getgroups()
		c := &client.Cred{UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}
		for _, g := range groups {
			c.Groups = append(c.Groups, uint32(g))
		}
		cmd.Cred = c
		if c.UID != 0 {
			cmd.Env[1] = "HOME=/tmp"
		}
	}
	ctx := context.Background()
	p, err := vm.Agent.Start(ctx, cmd, os.Stdout, os.Stderr)
	if err != nil {
		return fail("starting %q in the guest: %v", argv[0], err)
	}
	var status client.ExitStatus
	var waitErr error
	waited := make(chan struct{})
	go func() {
		status, waitErr = p.Wait()
		close(waited)
	}()
loop:
	for {
		select {
		case s := <-sigc:
			if err := p.Signal(ctx, s.(syscall.Signal)); err != nil {
				logger.Warn("forwarding signal", "signal", s, "err", err)
			}
		case <-vm.Done():
			return fail("the VM stopped while %q ran\n%s", argv[0], vm.ConsoleTail(15))
		case <-waited:
			break loop
		}
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := vm.Shutdown(sctx, 30*time.Second); err != nil {
		logger.Warn("VM shutdown", "err", err)
	}
	if waitErr != nil {
		return fail("%q in the guest: %v", argv[0], waitErr)
	}
	return status.ExitCode()
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
