package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	launcher "github.com/hpcvm/hpcvm/job-launcher"
	"github.com/hpcvm/hpcvm/vmm/imagevm"
)

func init() {
	register("launch", "run a Slurm job step in a VM (run by the SPANK plugin on compute nodes)", launchMain)
}

const launchUsage = `usage: hpcvm launch [options] -- COMMAND [ARGS...]
       hpcvm launch slice --plan JSON

The hpcvm SPANK plugin execs this in place of a job's task when the job was
submitted with --vm-image. It boots the VM on the step's nodes (one
'hpcvm launch slice' per node, started with srun --overlap), runs COMMAND in
the guest with the job's SLURM_* environment and exits with its status.
See docs/slurm.md.

options:
`

func launchMain(args []string) int {
	if len(args) > 0 && args[0] == "slice" {
		return launchSlice(args[1:])
	}
	if len(args) > 0 && args[0] == "vmm" {
		// Removed: one VMM command serves both.
		fmt.Fprintln(os.Stderr, "hpcvm launch vmm: removed; the VMM of a job step is hpcvm vm run --stop-signal=SIGUSR1")
		return 2
	}
	fs := flag.NewFlagSet("hpcvm launch", flag.ContinueOnError)
	var o launcher.Options
	fs.StringVar(&o.PolicyDir, "policy-dir", defaultPolicyDir, "site policy `DIR`")
	fs.StringVar(&o.ImageStore, "image-store", "/var/lib/hpcvm/images", "image store `DIR`")
	fs.StringVar(&o.RuntimeDir, "runtime-dir", "/run/hpcvm", "node-local `DIR` for per-step sockets, console and disk overlay")
	fs.StringVar(&o.Image, "image", "", "image `NAME` (--vm-image)")
	fs.StringVar(&o.Mem, "mem", "", "guest memory per node (--vm-mem; default: the job's memory per node minus the VMM reserve)")
	fs.IntVar(&o.CPUs, "cpus", 0, "vCPUs of the VM (--vm-cpus; default: all allocated CPUs)")
	fs.StringVar(&o.CheckpointInterval, "checkpoint-interval", "", "--vm-checkpoint-interval")
	fs.StringVar(&o.Console, "console", "", "write the guest console to `FILE` (--vm-console)")
	fs.StringVar(&o.DiskMode, "disk-mode", launcher.DiskModeCopy, "copy: boot a private writable copy-on-write view of the image's disk (an overlay file, nothing copied); ro: boot the image's disk read-only (root read-only, /tmp a tmpfs)")
	fs.BoolVar(&o.Batch, "batch", false, "the command is a batch script to stage into the guest")
	vmm := fs.String("vmm", "", "program the slices run as the VMM, with `hpcvm vm run`'s flags including --stop-signal=SIGUSR1 (default: hpcvm vm run)")
	bootTimeout := fs.Duration("boot-timeout", imagevm.DefaultBootTimeout, "give up if the guest agent does not answer within this")
	fs.StringVar(&o.Span, "span", launcher.SpanSingle, "single: the VM runs on the step's first node; nodes: one VM whose vCPUs and memory span every node of a multi-node step (distributed, docs/dsm.md; experimental)")
	verbose := fs.Bool("v", false, "log progress to stderr")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), launchUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	o.Argv = fs.Args()
	o.BootTimeout = *bootTimeout
	if o.Image == "" {
		fmt.Fprintln(os.Stderr, "hpcvm launch: --image is required")
		return 2
	}
	if o.DiskMode != launcher.DiskModeCopy && o.DiskMode != launcher.DiskModeShared {
		fmt.Fprintf(os.Stderr, "hpcvm launch: --disk-mode=%s: want copy or ro\n", o.DiskMode)
		return 2
	}
	if o.Span != launcher.SpanSingle && o.Span != launcher.SpanNodes {
		fmt.Fprintf(os.Stderr, "hpcvm launch: --span=%s: want single or nodes\n", o.Span)
		return 2
	}
	if len(o.Argv) == 0 {
		fmt.Fprintln(os.Stderr, "hpcvm launch: no command after --")
		return 2
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm launch: finding this binary: %v\n", err)
		return 1
	}
	o.VMM = []string{self, "vm", "run"}
	o.SliceVMM = []string{self, "slice"}
	if *vmm != "" {
		o.VMM = []string{*vmm}
	}
	level := slog.LevelWarn
	if *verbose || os.Getenv("HPCVM_LAUNCH_DEBUG") == "1" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	environ := os.Environ()
	env, err := launcher.ParseEnv(environ)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm launch: %v\n", err)
		return 1
	}
	// Signals are caught before anything starts, so that scancel during
	// the boot is handled (and not the default: die, leaving the VMMs to
	// Slurm).
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGCONT)
	defer signal.Stop(sigs)
	l := &launcher.Launcher{
		Opts: o, Env: env, Environ: environ,
		Policy: launcher.ExecPolicy{Hpcvm: self, Dir: o.PolicyDir},
		Images: launcher.StoreImages{Dir: o.ImageStore},
		// HPCVM_VMM_LOG keeps the slices' output (their errors, JSON
		// summaries, HPCVM_SLICE_STATS_EVERY samples) in a file of the
		// user's choosing: the default, in the runtime directory, goes
		// with the job.
		Booter:    &launcher.SrunBooter{Hpcvm: self, Environ: environ, Log: log, LogFile: os.Getenv(VMMLogEnv)},
		Walltime:  func(ctx context.Context) int64 { return jobTimeLimit(ctx, env.JobID) },
		NodeAddrs: nodeAddrs,
		Signals:   sigs, Stdout: os.Stdout, Stderr: os.Stderr, Log: log,
	}
	return l.Run(context.Background())
}

// jobTimeLimit asks scontrol for the job's TimeLimit in seconds (0 when
// unknown: Slurm 22.05 does not put it in the environment).
func jobTimeLimit(ctx context.Context, jobID string) int64 {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "scontrol", "show", "job", "-o", jobID).Output()
	if err != nil {
		return 0
	}
	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(f, "TimeLimit="); ok {
			d, err := launcher.ParseTimeLimit(v)
			if err != nil {
				return 0
			}
			return int64(d / time.Second)
		}
	}
	return 0
}

// launchSlice is one node's VMM slice, started by the launcher via srun.
func launchSlice(args []string) int {
	fs := flag.NewFlagSet("hpcvm launch slice", flag.ContinueOnError)
	planArg := fs.String("plan", "", "the step's plan (JSON, from hpcvm launch)")
	index := fs.Int("index", -1, "this slice's index (default: $SLURM_PROCID)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	plan, err := launcher.DecodePlan(*planArg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm launch slice: %v\n", err)
		return 2
	}
	if *index < 0 {
		if *index, err = strconv.Atoi(os.Getenv("SLURM_PROCID")); err != nil {
			fmt.Fprintln(os.Stderr, "hpcvm launch slice: no --index and no SLURM_PROCID")
			return 2
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	// SIGUSR1 is the launcher's stop request (srun forwards it as is): stop
	// now. SIGTERM is Slurm ending the job (scancel, time limit): it reaches
	// the launcher at the same time, which forwards it to the guest command
	// and then sends SIGUSR1; the VM must live until then, so a slice waits
	// SliceTermDelay for that before stopping on its own (the launcher may
	// be gone). Slurm's KillWait must be longer.
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		var delayed <-chan time.Time
		for {
			select {
			case s := <-sigs:
				if s == syscall.SIGUSR1 {
					stop()
					return
				}
				if delayed == nil {
					delayed = time.After(launcher.SliceTermDelay)
				}
			case <-delayed:
				stop()
				return
			}
		}
	}()
	launcher.ReapStaleCgroups(context.Background(), plan.Cluster, launcher.SqueueRunning, log)
	if err := launcher.RunSlice(ctx, plan, *index, log); err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm launch slice: %v\n", err)
		return 1
	}
	return 0
}

// nodeAddrs asks scontrol for each node's NodeAddr (the address slurmd and
// the nodes use; the node name when slurm.conf sets none).
func nodeAddrs(ctx context.Context, nodes []string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	addrs := make([]string, len(nodes))
	for i, n := range nodes {
		out, err := exec.CommandContext(ctx, "scontrol", "show", "node", "-o", n).Output()
		if err != nil {
			return nil, fmt.Errorf("scontrol show node %s: %w", n, err)
		}
		addr := ""
		for _, f := range strings.Fields(string(out)) {
			if v, ok := strings.CutPrefix(f, "NodeAddr="); ok {
				addr = v
			}
		}
		if addr == "" {
			return nil, fmt.Errorf("scontrol show node %s: no NodeAddr", n)
		}
		addrs[i] = addr
	}
	return addrs, nil
}
