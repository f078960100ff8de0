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
	"strings"
	"syscall"

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

// diskFlags collects repeated --disk PATH[,ro] values.
type diskFlags []linuxvm.Disk

func (d *diskFlags) String() string { return fmt.Sprint(*d) }
func (d *diskFlags) Set(v string) error {
	path, opts, _ := strings.Cut(v, ",")
	disk := linuxvm.Disk{Path: path}
	for _, o := range strings.Split(opts, ",") {
		switch o {
		case "":
		case "ro":
			disk.ReadOnly = true
		case "rw":
			disk.ReadOnly = false
		default:
			return fmt.Errorf("unknown disk option %q (known: ro, rw)", o)
		}
	}
	if path == "" {
		return errors.New("empty disk path")
	}
	*d = append(*d, disk)
	return nil
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
	verbose := fs.Bool("v", false, "log VMM events to stderr")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: hpcvm vm run --kernel K [--initrd I] [--disk PATH[,ro]] [--cpus N] [--mem SIZE] [--cmdline S] [--vsock SOCKET] [--console FILE]\n\n"+
			"Boots a Linux guest on this node. Guest poweroff exits 0; a guest panic or reboot exits 1 with the reason;\n"+
			"SIGINT/SIGTERM stop the guest (exit 130/143).\n\noptions:\n")
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	exit, err := linuxvm.Run(ctx, cfg)
	if err != nil {
		return fail("%v", err)
	}
	switch exit.Kind {
	case machine.ExitPoweroff:
		return 0
	case machine.ExitStopped:
		select {
		case s := <-sigc:
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
