package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/hpcvm/hpcvm/internal/units"
	"github.com/hpcvm/hpcvm/vmm/linuxvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
)

func init() {
	register("vm", "run a virtual machine directly (hpcvm vm run --kernel ...)", vmMain)
}

func vmMain(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintln(os.Stderr, "usage: hpcvm vm run [options]   (see hpcvm vm run --help)")
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	switch args[0] {
	case "run":
		return vmRun(args[1:])
	default:
		fmt.Fprintf(os.Stderr, "hpcvm vm: unknown subcommand %q (known: run)\n", args[0])
		return 2
	}
}

// diskFlags collects repeated --disk PATH[,ro|,overlay=FILE] values.
type diskFlags []linuxvm.Disk

func (d *diskFlags) String() string { return fmt.Sprint(*d) }
func (d *diskFlags) Set(v string) error {
	path, opts, _ := strings.Cut(v, ",")
	disk := linuxvm.Disk{Path: path}
	for _, o := range strings.Split(opts, ",") {
		switch k, val, _ := strings.Cut(o, "="); {
		case o == "":
		case o == "ro":
			disk.ReadOnly = true
		case o == "rw":
			disk.ReadOnly = false
		case k == "overlay":
			if val == "" {
				return errors.New("overlay= needs a file")
			}
			disk.Overlay = val
		default:
			return fmt.Errorf("unknown disk option %q (known: ro, rw, overlay=FILE)", o)
		}
	}
	if path == "" {
		return errors.New("empty disk path")
	}
	if disk.ReadOnly && disk.Overlay != "" {
		return errors.New("a read-only disk needs no overlay")
	}
	*d = append(*d, disk)
	return nil
}

// parseSignal reads a signal name: SIGUSR1, USR1 (any case) or a number.
func parseSignal(v string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(v); err == nil {
		if n <= 0 || n >= 65 {
			return 0, fmt.Errorf("no signal %d", n)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(v)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	s := unix.SignalNum(name)
	if s == 0 {
		return 0, fmt.Errorf("unknown signal %q", v)
	}
	return s, nil
}

// stopSignals is how `hpcvm vm run` treats signals. By default SIGINT and
// SIGTERM stop the guest. With a stop signal, only that one does, and
// SIGINT, SIGTERM and SIGHUP are caught and dropped: a VMM in a Slurm job
// step gets the step's SIGTERM (scancel, time limit) with every other
// process of the job and must outlive it until its slice asks it to stop
// (docs/slurm.md). The returned context ends on a stopping signal; got
// reports which one came; release undoes it all.
func stopSignals(stopSig syscall.Signal) (ctx context.Context, got func() (os.Signal, bool), release func()) {
	stopOn := []os.Signal{syscall.SIGINT, syscall.SIGTERM}
	var dropped chan os.Signal
	if stopSig != 0 {
		stopOn = []os.Signal{stopSig}
		// Caught and dropped rather than ignored: an ignored signal
		// stays ignored in every process started from here.
		dropped = make(chan os.Signal, 1)
		signal.Notify(dropped, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu  sync.Mutex
		sig os.Signal
	)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, stopOn...)
	done := make(chan struct{})
	go func() {
		select {
		case s := <-sigc:
			mu.Lock()
			sig = s
			mu.Unlock()
			cancel()
		case <-done:
		}
	}()
	got = func() (os.Signal, bool) {
		mu.Lock()
		defer mu.Unlock()
		return sig, sig != nil
	}
	release = func() {
		signal.Stop(sigc)
		if dropped != nil {
			signal.Stop(dropped)
		}
		close(done)
		cancel()
	}
	return ctx, got, release
}

func vmRun(args []string) int {
	fs := flag.NewFlagSet("hpcvm vm run", flag.ContinueOnError)
	kernel := fs.String("kernel", "", "guest kernel: bzImage or ELF vmlinux with a PVH note (required)")
	initrd := fs.String("initrd", "", "initial ramdisk")
	var disks diskFlags
	fs.Var(&disks, "disk", "virtio-blk disk `PATH[,ro]` on a raw image (repeatable; ro = read-only)")
	cpus := fs.Int("cpus", 1, "number of vCPUs")
	mem := fs.String("mem", "512MiB", "guest memory `SIZE` (e.g. 512MiB, 2GiB)")
	cmdline := fs.String("cmdline", linuxvm.DefaultCmdline, "kernel command line (devices are described to the guest in ACPI tables)")
	vsock := fs.String("vsock", "", "Unix `SOCKET` of the virtio-vsock device (hybrid protocol: CONNECT <port>\\n); guest connections go to SOCKET_<port>")
	cid := fs.Uint64("vsock-cid", 3, "guest vsock context ID")
	console := fs.String("console", "", "write the serial console to `FILE` instead of stdout")
	stopSigName := fs.String("stop-signal", "", "stop the guest only on `SIGNAL` (e.g. SIGUSR1) and exit 0; SIGINT, SIGTERM and SIGHUP are then caught and ignored (the VMM of a Slurm job step, see docs/slurm.md)")
	verbose := fs.Bool("v", false, "log VMM events to stderr")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: hpcvm vm run --kernel K [--initrd I] [--disk PATH[,ro|,overlay=FILE]] [--cpus N] [--mem SIZE] [--cmdline S] [--vsock SOCKET] [--console FILE] [--stop-signal SIG]\n\n"+
			"Boots a Linux guest on this node. Guest poweroff exits 0; a guest panic or reboot exits 1 with the reason;\n"+
			"SIGINT/SIGTERM stop the guest (exit 130/143). With --stop-signal SIG only SIG stops it (exit 0) and\n"+
			"SIGINT/SIGTERM/SIGHUP are ignored.\n\noptions:\n")
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	memBytes, err := units.ParseSize(*mem)
	if err != nil {
		return fail("--mem: %v", err)
	}
	var stopSig syscall.Signal
	if *stopSigName != "" {
		if stopSig, err = parseSignal(*stopSigName); err != nil {
			return fail("--stop-signal: %v", err)
		}
		if stopSig == syscall.SIGKILL || stopSig == syscall.SIGSTOP {
			return fail("--stop-signal: %v cannot be caught", stopSig)
		}
	}
	// Signals are handled from here on: a job step's SIGTERM may come
	// at any time.
	ctx, stopped, release := stopSignals(stopSig)
	defer release()
	logLevel := slog.LevelWarn
	if *verbose {
		logLevel = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))

	var out io.Writer = os.Stdout
	if *console != "" {
		f, err := os.OpenFile(*console, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return fail("--console: %v", err)
		}
		defer f.Close()
		out = f
	}
	cfg := linuxvm.Config{
		Kernel: *kernel, Initrd: *initrd, Cmdline: *cmdline,
		CPUs: *cpus, MemBytes: memBytes, Disks: disks,
		VsockPath: *vsock, VsockCID: uint32(*cid),
		Console: out, ConsoleIn: os.Stdin, Logger: logger,
	}
	if err := cfg.Validate(); err != nil {
		return fail("%v", err)
	}
	exit, err := linuxvm.Run(ctx, cfg)
	if err != nil {
		return fail("%v", err)
	}
	switch exit.Kind {
	case machine.ExitPoweroff:
		return 0
	case machine.ExitStopped:
		s, ok := stopped()
		switch {
		case ok && s == stopSig:
			// A requested stop (--stop-signal): a clean end.
			fmt.Fprintf(os.Stderr, "hpcvm: guest stopped by %v\n", s)
			return 0
		case ok:
			fmt.Fprintf(os.Stderr, "hpcvm: guest stopped by %v\n", s)
			return 128 + int(s.(syscall.Signal))
		default:
			fmt.Fprintf(os.Stderr, "hpcvm: guest stopped: %s\n", exit.Reason)
			return 1
		}
	default:
		fmt.Fprintf(os.Stderr, "hpcvm: guest %s: %s\n", exit.Kind, exit.Reason)
		return 1
	}
}

// fail prints a one-line error and returns the usage-error status.
func fail(format string, args ...any) int {
	fmt.Fprintf(os.Stderr, "hpcvm: "+format+"\n", args...)
	return 1
}
