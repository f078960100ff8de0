package main

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/internal/units"
	"github.com/hpcvm/hpcvm/vmm/dsm"
	"github.com/hpcvm/hpcvm/vmm/linuxvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
	"github.com/hpcvm/hpcvm/vmm/microguest"
)

func init() {
	register("slice", "run one slice of a distributed VM (started by the launcher, one per node)", sliceMain)
}

// sliceOpts are the parsed and checked options of `hpcvm slice`.
type sliceOpts struct {
	id        int
	peers     []string
	listen    string
	vmID      string
	secret    []byte
	placement [][]int
	memBytes  uint64
	code      []byte   // micro-guest code
	guest     string   // for messages: builtin:NAME or the file
	results   []uint64 // guest-physical addresses printed at the end (slice 0)
	timeout   time.Duration
	hold      time.Duration // coherence hold window (dsm.NodeConfig.Hold)
	vcpuNice  int           // nice of the vCPU threads (dsm.SliceConfig.VCPUNice)
	// timerSlack: the vCPUs' timer grid (dsm.SliceConfig.TimerSlack).
	timerSlack time.Duration
	replicate  bool          // replicated page tables (docs/dsm.md)
	numa       bool          // each slice a NUMA node of the guest (--numa)
	profile    time.Duration // RIP sampling period (0: off)
	// statsEvery and onStats: the periodic counters (StatsEveryEnv).
	statsEvery time.Duration
	onStats    func(dsm.StatsSnapshot)
	stopSig    syscall.Signal // --stop-signal (0: SIGINT and SIGTERM stop the slice)
	stopped    func() (os.Signal, bool)
	verbose    bool
	linux      *sliceLinux // a Linux guest instead of a micro-guest
}

// sliceLinux is the Linux guest of `hpcvm slice --kernel`.
type sliceLinux struct {
	kernel, initrd, cmdline string
	disks                   diskFlags
	vsock                   string
	cid                     uint64
	console                 string
}

// sliceOutput is what a slice prints on stdout (one JSON object) when it
// stops. Only slice 0 has reports and results: every vCPU's device
// accesses are performed on slice 0.
type sliceOutput struct {
	Slice   int               `json:"slice"`
	Exit    string            `json:"exit"`
	Reason  string            `json:"reason,omitempty"`
	Error   string            `json:"error,omitempty"`
	Reports []uint32          `json:"reports"`
	Results []sliceResult     `json:"results,omitempty"`
	Stats   dsm.StatsSnapshot `json:"stats"`
	// HotPages: the guest pages this slice requested most (docs/dsm.md).
	HotPages []dsm.HotPage `json:"hot_pages,omitempty"`
	// Profile: where the local vCPUs were, sampled (--profile).
	Profile *dsm.RIPProfile `json:"profile,omitempty"`
	VCPUs   []int           `json:"vcpus"`
	Elapsed string          `json:"elapsed"`
}

type sliceResult struct {
	Addr  string `json:"addr"`
	Value uint64 `json:"value"`
}

// addrList collects repeated --result addresses.
type addrList []uint64

func (a *addrList) String() string { return fmt.Sprint(*a) }
func (a *addrList) Set(v string) error {
	n, err := strconv.ParseUint(v, 0, 64)
	if err != nil {
		return fmt.Errorf("%q is not an address (decimal or 0x hex)", v)
	}
	if n%8 != 0 {
		return fmt.Errorf("address %#x is not 8-byte aligned", n)
	}
	*a = append(*a, n)
	return nil
}

func sliceUsage(fs *flag.FlagSet) {
	fmt.Fprintf(fs.Output(), `usage: hpcvm slice --id N --peers HOST:PORT,... --vm-id ID --secret-file F --placement P
                   (--builtin NAME [--iters N] | --program FILE [--result ADDR]... |
                    --kernel K [--initrd I] [--cmdline S] [--disk D]... [--vsock S] [--console F]) [--mem SIZE]

Runs slice N of a distributed VM: the vCPUs the placement gives it, over guest memory kept
coherent with the other slices over authenticated TCP (docs/dsm.md). The launcher starts one
slice per node with identical options except --id (and --listen).

The guest is a micro-guest (x86-64 code started at CPL3 in long mode on every vCPU with
RDI = vCPU id and RSI = vCPU count; port 0x%x reports a value, port 0x%x marks the vCPU done).
When every vCPU is done, slice 0 reads the --result addresses and all slices stop.

With --kernel the guest is Linux: slice 0 loads it and hosts every device, vCPU 0 must be on
slice 0, and the VM stops on every slice when the guest powers off or resets. Each slice
prints one JSON object on stdout. Exit status: 0 when the VM finished, 1 on failure (a lost
slice is named), 2 on bad options.

options:
`, dsm.ReportPort, dsm.DonePort)
	fs.PrintDefaults()
	fmt.Fprintf(fs.Output(), "\nbuilt-in programs: %s\n", strings.Join(dsm.ProgramNames(), ", "))
}

// sliceFlags is the flag set of `hpcvm slice`.
type sliceFlags struct {
	fs                                              *flag.FlagSet
	id, iters, vcpuNice                             *int
	peers, listen, vmID, secretFile, placement, mem *string
	builtin, program, timeout, hold, stopSignal     *string
	profile, timerSlack                             *string
	results                                         addrList
	verbose, replicateTables, numa                  *bool
	kernel, initrd, cmdline, vsock, console         *string
	disks                                           diskFlags
	cid                                             *uint64
}

func newSliceFlags() *sliceFlags {
	fs := flag.NewFlagSet("hpcvm slice", flag.ContinueOnError)
	f := &sliceFlags{fs: fs}
	f.id = fs.Int("id", -1, "this slice's `N` (0 is the home slice: devices and results)")
	f.peers = fs.String("peers", "", "every slice's `HOST:PORT`, comma-separated, in slice-id order (this slice's included)")
	f.listen = fs.String("listen", "", "`ADDR` to listen on (default: this slice's entry in --peers)")
	f.vmID = fs.String("vm-id", "", "the VM's `ID` (the same on every slice; authenticated)")
	f.secretFile = fs.String("secret-file", "", "`FILE` holding the VM's shared secret (16..4096 bytes, mode 0600)")
	f.placement = fs.String("placement", "", "vCPU ids per slice, `P` = groups in slice-id order separated by '/', e.g. 0-1/2,3 (a group may be empty)")
	f.mem = fs.String("mem", "64MiB", "guest memory `SIZE`")
	f.builtin = fs.String("builtin", "", "run the built-in micro-guest `NAME`")
	f.iters = fs.Int("iters", 1000, "iterations for --builtin (`N` >= 1)")
	f.program = fs.String("program", "", "run the micro-guest code in `FILE` (raw x86-64 bytes loaded at 0x10000)")
	fs.Var(&f.results, "result", "print the qword at guest-physical `ADDR` when done (repeatable; --builtin adds its own)")
	f.kernel = fs.String("kernel", "", "boot the Linux `KERNEL` (bzImage or PVH vmlinux) instead of a micro-guest; read by slice 0 only")
	f.initrd = fs.String("initrd", "", "initial ramdisk `FILE` of --kernel (slice 0)")
	f.cmdline = fs.String("cmdline", linuxvm.DefaultCmdline, "kernel command line of --kernel")
	fs.Var(&f.disks, "disk", "virtio-blk disk `PATH[,ro|,overlay=FILE]` of --kernel on slice 0 (repeatable)")
	f.vsock = fs.String("vsock", "", "Unix `SOCKET` of the guest's virtio-vsock device on slice 0 (hybrid protocol, as hpcvm vm run)")
	f.cid = fs.Uint64("vsock-cid", 3, "guest vsock context ID")
	f.console = fs.String("console", "", "write the guest's serial console to `FILE` (slice 0; default: stderr)")
	f.timeout = fs.String("timeout", "0", "stop with an error after `DURATION` (e.g. 10m; 0: no limit)")
	f.hold = fs.String("hold", "0", "keep a page granted for writing at least `DURATION` before giving it up (e.g. 2ms; damps page-table ping-pong; 0: off)")
	f.timerSlack = fs.String("timer-slack", os.Getenv(TimerSlackEnv), "coalesce the vCPUs' TSC-deadline timer expiries on a grid of `PERIOD` (0-100ms; 0: exact): a spread guest's tick then reaches for other nodes' pages less often (docs/dsm.md; default from $"+TimerSlackEnv+", else "+linuxTimerSlack.String()+" for a Linux guest and 0 for a micro-guest)")
	f.vcpuNice = fs.Int("vcpu-nice", 0, "nice `N` (0-19) of the vCPU threads, the process's other threads (serving the other slices' page requests) keeping their priority (0: unchanged; docs/dsm.md: on one-CPU virt nodes 10 starved the vCPUs)")
	f.stopSignal = fs.String("stop-signal", "", "stop only on `SIGNAL` (e.g. SIGUSR1) and exit 0; SIGINT, SIGTERM and SIGHUP are then caught and ignored (a slice of a Slurm job step, as hpcvm vm run --stop-signal)")
	f.replicateTables = fs.Bool("replicate-tables", false, "replicate page-table pages instead of moving them: a micro-guest's tables, or a --kernel guest's static kernel tables (docs/dsm.md, \"Replicated page tables\")")
	f.numa = fs.Bool("numa", false, "describe each slice that runs vCPUs as a NUMA node of a --kernel guest (ACPI SRAT/SLIT; docs/dsm.md, \"Linux guests\")")
	f.profile = fs.String("profile", cmp.Or(os.Getenv(ProfileEnv), "0"), "sample where the local vCPUs are every `PERIOD` (e.g. 10ms) and print the most frequent guest addresses, named from --kernel's symbols (docs/dsm.md; 0: off; default from $"+ProfileEnv+")")
	f.verbose = fs.Bool("v", false, "log protocol events to stderr")
	fs.Usage = func() { sliceUsage(fs) }
	return f
}

// linuxTimerSlack is a Linux slice's default --timer-slack: with it a
// debian12 job across 2 nodes took 6 min 25 s instead of 12 min 28 s, its
// bound parsum 2.3 s instead of 5.2 s (session 12, sequential runs); the
// remote vCPU's 250 Hz tick, slower than its period, had never stopped.
// Guest timers fire up to this much late.
const linuxTimerSlack = 20 * time.Millisecond

// parseSliceArgs parses and checks the options; every error names the
// option at fault. --help yields flag.ErrHelp.
func parseSliceArgs(args []string) (*sliceOpts, error) {
	f := newSliceFlags()
	fs := f.fs
	id, peers, listen, vmID, secretFile, placement := f.id, f.peers, f.listen, f.vmID, f.secretFile, f.placement
	mem, builtin, iters, program, timeout, verbose := f.mem, f.builtin, f.iters, f.program, f.timeout, f.verbose
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	results := f.results
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	o := &sliceOpts{id: *id, listen: *listen, vmID: *vmID, results: results, verbose: *verbose}
	if *peers == "" {
		return nil, errors.New("--peers is required")
	}
	seen := map[string]bool{}
	for i, p := range strings.Split(*peers, ",") {
		p = strings.TrimSpace(p)
		host, port, err := net.SplitHostPort(p)
		if err != nil || host == "" {
			return nil, fmt.Errorf("--peers: entry %d %q is not HOST:PORT", i, p)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("--peers: entry %d %q: port %q is not 1..65535", i, p, port)
		}
		if seen[p] {
			return nil, fmt.Errorf("--peers: %q is listed twice", p)
		}
		seen[p] = true
		o.peers = append(o.peers, p)
	}
	if o.id < 0 || o.id >= len(o.peers) {
		if o.id == -1 {
			return nil, errors.New("--id is required")
		}
		return nil, fmt.Errorf("--id %d: not in 0..%d (one slice per --peers entry)", o.id, len(o.peers)-1)
	}
	if o.listen == "" {
		o.listen = o.peers[o.id]
	} else if _, _, err := net.SplitHostPort(o.listen); err != nil {
		return nil, fmt.Errorf("--listen %q: not HOST:PORT", o.listen)
	}
	if o.vmID == "" || len(o.vmID) > dsm.MaxVMIDLen {
		return nil, fmt.Errorf("--vm-id: must be 1..%d bytes", dsm.MaxVMIDLen)
	}
	if *secretFile == "" {
		return nil, errors.New("--secret-file is required")
	}
	secret, err := readSecret(*secretFile)
	if err != nil {
		return nil, fmt.Errorf("--secret-file: %w", err)
	}
	o.secret = secret
	if *placement == "" {
		return nil, errors.New("--placement is required")
	}
	if o.placement, err = dsm.ParsePlacement(*placement); err != nil {
		return nil, fmt.Errorf("--placement: %w", err)
	}
	if _, err := dsm.CheckPlacement(o.placement, len(o.peers)); err != nil {
		return nil, fmt.Errorf("--placement: %w", err)
	}
	if o.memBytes, err = units.ParseSize(*mem); err != nil {
		return nil, fmt.Errorf("--mem: %w", err)
	}
	if *f.kernel != "" {
		if *builtin != "" || *program != "" {
			return nil, errors.New("--kernel and --builtin/--program are mutually exclusive")
		}
		if len(results) > 0 {
			return nil, errors.New("--result is for micro-guests, not --kernel")
		}
		o.linux = &sliceLinux{kernel: *f.kernel, initrd: *f.initrd, cmdline: *f.cmdline, disks: f.disks,
			vsock: *f.vsock, cid: *f.cid, console: *f.console}
		o.guest = *f.kernel
		if err := linuxvm.CheckBootPlacement(o.placement); err != nil {
			return nil, fmt.Errorf("--%w (--kernel)", err)
		}
	} else if len(f.disks) > 0 || *f.initrd != "" || *f.vsock != "" || *f.console != "" {
		return nil, errors.New("--initrd, --disk, --vsock and --console need --kernel")
	}
	if o.linux != nil {
		if o.memBytes < linuxvm.MinMemBytes || o.memBytes%memory.PageSize != 0 {
			return nil, fmt.Errorf("--mem %s: a Linux guest needs a multiple of 4KiB and at least %s", *mem, units.FormatSize(linuxvm.MinMemBytes))
		}
	} else if o.memBytes < microguest.MinMemory || o.memBytes%memory.PageSize != 0 {
		return nil, fmt.Errorf("--mem %s: must be a multiple of 4KiB and at least %s", *mem, units.FormatSize(microguest.MinMemory))
	}
	if o.timeout, err = units.ParseDuration(*timeout); err != nil {
		return nil, fmt.Errorf("--timeout: %w", err)
	}
	if o.hold, err = time.ParseDuration(*f.hold); err != nil {
		return nil, fmt.Errorf("--hold: %w", err)
	}
	if *f.stopSignal != "" {
		if o.stopSig, err = parseSignal(*f.stopSignal); err != nil {
			return nil, fmt.Errorf("--stop-signal: %w", err)
		}
	}
	if *f.vcpuNice < 0 || *f.vcpuNice > 19 {
		return nil, fmt.Errorf("--vcpu-nice %d: must be between 0 and 19", *f.vcpuNice)
	}
	o.vcpuNice = *f.vcpuNice
	if *f.timerSlack != "" { // unset: the guest's default, below
		if o.timerSlack, err = time.ParseDuration(*f.timerSlack); err != nil {
			return nil, fmt.Errorf("--timer-slack: %w", err)
		}
		if o.timerSlack < 0 || o.timerSlack > 100*time.Millisecond {
			return nil, fmt.Errorf("--timer-slack %s: must be between 0 and 100ms", *f.timerSlack)
		}
	}
	if o.hold < 0 || o.hold > time.Second {
		return nil, fmt.Errorf("--hold %s: must be between 0 and 1s", *f.hold)
	}
	if o.profile, err = time.ParseDuration(*f.profile); err != nil {
		return nil, fmt.Errorf("--profile: %w", err)
	}
	if o.profile != 0 && (o.profile < time.Millisecond || o.profile > time.Minute) {
		return nil, fmt.Errorf("--profile %s: must be 0 (off) or between 1ms and 1m", *f.profile)
	}
	o.replicate = *f.replicateTables
	o.numa = *f.numa
	if o.numa && o.linux == nil {
		return nil, errors.New("--numa needs --kernel")
	}
	switch {
	case o.linux != nil:
	case *builtin != "" && *program != "":
		return nil, errors.New("--builtin and --program are mutually exclusive")
	case *builtin != "":
		b, err := dsm.LookupProgram(*builtin)
		if err != nil {
			return nil, fmt.Errorf("--builtin: %w", err)
		}
		if *iters < 1 || *iters > 1<<40 {
			return nil, fmt.Errorf("--iters %d: must be 1..2^40", *iters)
		}
		o.code, o.guest = b.Build(*iters), "builtin:"+*builtin
		o.results = append(append([]uint64{}, b.Results...), o.results...)
	case *program != "":
		code, err := os.ReadFile(*program)
		if err != nil {
			return nil, fmt.Errorf("--program: %w", err)
		}
		if len(code) == 0 {
			return nil, fmt.Errorf("--program %s: empty file", *program)
		}
		o.code, o.guest = code, *program
	default:
		return nil, errors.New("a guest is required: --builtin NAME, --program FILE or --kernel FILE")
	}
	if *f.timerSlack == "" && o.linux != nil {
		o.timerSlack = linuxTimerSlack
	}
	for _, a := range o.results {
		if a+8 > o.memBytes {
			return nil, fmt.Errorf("--result %#x: outside guest memory (%s)", a, units.FormatSize(o.memBytes))
		}
	}
	return o, nil
}

// readSecret reads the VM secret, refusing a file others could read.
func readSecret(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %04o: group and others must have no access (chmod 600 %s)", path, perm, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 4097))
	if err != nil {
		return nil, err
	}
	if len(b) < 16 || len(b) > 4096 {
		return nil, fmt.Errorf("%s holds %d bytes: a secret must be 16..4096 bytes", path, len(b))
	}
	return b, nil
}

func sliceMain(args []string) int {
	o, err := parseSliceArgs(args)
	if errors.Is(err, flag.ErrHelp) {
		f := newSliceFlags()
		f.fs.SetOutput(os.Stderr)
		f.fs.Usage()
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm slice: %v (see hpcvm slice --help)\n", err)
		return 2
	}
	return runSlice(o, os.Stdout)
}

// reportDev collects the values vCPUs write to the report port.
type reportDev struct {
	mu      sync.Mutex
	reports []uint32
}

func (r *reportDev) Read(uint64, []byte) {}
func (r *reportDev) Write(_ uint64, d []byte) {
	var b [4]byte
	copy(b[:], d)
	r.mu.Lock()
	r.reports = append(r.reports, binary.LittleEndian.Uint32(b[:]))
	r.mu.Unlock()
}

func runSlice(o *sliceOpts, stdout io.Writer) int {
	level := slog.LevelWarn
	if o.verbose {
		level = slog.LevelDebug
	}
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("vm", o.vmID)
	if os.Getenv("GOMAXPROCS") == "" {
		// Threads waiting in the kernel hold Ps: leave Ps for the protocol.
		runtime.GOMAXPROCS(dsm.SliceGOMAXPROCS(len(o.placement[o.id]), len(o.peers)))
	}
	if stop, err := startCPUProfile(os.Getenv(CPUProfileEnv), o.id); err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm slice %d: %s: %v\n", o.id, CPUProfileEnv, err)
		return 1
	} else {
		defer stop()
	}
	var err error
	if o.statsEvery, o.onStats, err = statsReporter(os.Getenv(StatsEveryEnv), o.id, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm slice %d: %v\n", o.id, err)
		return 2
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm slice %d: listen on %s: %v\n", o.id, o.listen, err)
		return 1
	}
	ctx, stopped, release := stopSignals(o.stopSig)
	defer release()
	o.stopped = stopped
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, o.timeout, fmt.Errorf("--timeout %v reached", o.timeout))
		defer cancel()
	}
	if o.linux != nil {
		return runLinuxSlice(ctx, o, ln, lg, stdout)
	}
	rep := &reportDev{}
	var results []sliceResult
	cfg := dsm.SliceConfig{
		Transport:  dsm.TransportConfig{ID: o.id, Addrs: o.peers, Listener: ln, VMID: o.vmID, Secret: o.secret, Logger: lg},
		Placement:  o.placement,
		MemBytes:   o.memBytes,
		Loader:     microguest.Program{Code: o.code},
		DonePort:   dsm.DonePort,
		Hold:       o.hold,
		VCPUNice:   o.vcpuNice,
		TimerSlack: o.timerSlack,
		// The micro-guest's tables are fixed at load time, so its initial
		// CR3 names them all.
		ReplicateTables: o.replicate,
		ProfileEvery:    o.profile,
		StatsEvery:      o.statsEvery,
		OnStats:         o.onStats,
		Setup: func(h *dsm.Home) error {
			return h.Machine.IO.Register("report", dsm.ReportPort, 1, rep)
		},
		Finish: func(g memory.Guest) error {
			for _, a := range o.results {
				var b [8]byte
				if _, err := g.ReadAt(b[:], int64(a)); err != nil {
					return fmt.Errorf("reading result at %#x: %w", a, err)
				}
				results = append(results, sliceResult{Addr: fmt.Sprintf("%#x", a), Value: binary.LittleEndian.Uint64(b[:])})
			}
			return nil
		},
		Logger: lg,
	}
	start := time.Now()
	res, err := dsm.RunSlice(ctx, cfg)
	rep.mu.Lock()
	reports := append([]uint32{}, rep.reports...)
	rep.mu.Unlock()
	if o.id != 0 {
		results = nil
	}
	return endSlice(stdout, o, start, res, err, reports, results)
}

// endSlice prints the slice's JSON summary on stdout and a one-line error
// on stderr unless the VM powered off; it returns the exit status.
func endSlice(stdout io.Writer, o *sliceOpts, start time.Time, res dsm.SliceResult, err error, reports []uint32, results []sliceResult) int {
	out := sliceOutput{Slice: o.id, Exit: res.Exit.Kind.String(), Reason: res.Exit.Reason, Stats: res.Stats, HotPages: res.HotPages,
		Profile: res.Profile, VCPUs: o.placement[o.id], Elapsed: time.Since(start).Round(time.Millisecond).String(),
		Reports: reports, Results: results}
	if err != nil {
		out.Error = err.Error()
	}
	json.NewEncoder(stdout).Encode(out)
	if o.stopSig != 0 && o.stopped != nil {
		if s, ok := o.stopped(); ok && s == o.stopSig {
			// A requested stop (--stop-signal): a clean end, however the
			// other slices' stops reached this one first.
			fmt.Fprintf(os.Stderr, "hpcvm slice %d: stopped by %v\n", o.id, s)
			return 0
		}
	}
	if err != nil || res.Exit.Kind != machine.ExitPoweroff {
		msg := res.Exit.Reason
		if err != nil {
			msg = err.Error()
		}
		fmt.Fprintf(os.Stderr, "hpcvm slice %d: %s\n", o.id, msg)
		return 1
	}
	return 0
}

// runLinuxSlice runs slice o.id of a Linux guest: slice 0 loads the kernel
// and hosts the devices, every slice runs its vCPUs (docs/dsm.md).
func runLinuxSlice(ctx context.Context, o *sliceOpts, ln net.Listener, lg *slog.Logger, stdout io.Writer) int {
	var console io.Writer = os.Stderr
	if o.linux.console != "" && o.id == 0 {
		f, err := os.OpenFile(o.linux.console, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			ln.Close()
			fmt.Fprintf(os.Stderr, "hpcvm slice %d: --console: %v\n", o.id, err)
			return 1
		}
		defer f.Close()
		console = f
	}
	l := o.linux
	cfg := linuxvm.SliceConfig{
		VM: linuxvm.Config{Kernel: l.kernel, Initrd: l.initrd, Cmdline: l.cmdline, MemBytes: o.memBytes,
			Disks: l.disks, VsockPath: l.vsock, VsockCID: uint32(l.cid), Console: console, Logger: lg},
		Transport:  dsm.TransportConfig{ID: o.id, Addrs: o.peers, Listener: ln, VMID: o.vmID, Secret: o.secret, Logger: lg},
		Placement:  o.placement,
		Hold:       o.hold,
		VCPUNice:   o.vcpuNice,
		TimerSlack: o.timerSlack,
		// Linux builds and frees page tables as it runs: only its static
		// kernel tables are replicated (docs/dsm.md).
		ReplicateKernelTables: o.replicate,
		ProfileEvery:          o.profile,
		StatsEvery:            o.statsEvery,
		OnStats:               o.onStats,
		NUMA:                  o.numa,
	}
	start := time.Now()
	res, err := linuxvm.RunSlice(ctx, cfg)
	return endSlice(stdout, o, start, res, err, []uint32{}, nil)
}
