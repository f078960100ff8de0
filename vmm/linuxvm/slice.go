package linuxvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hpcvm/hpcvm/vmm/boot"
	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/dsm"
	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
)

// SliceConfig is one slice of a Linux VM spread over several VMM processes
// (docs/dsm.md). VM describes the whole VM; its CPUs come from Placement.
// Only slice 0 (the home: kernel loading and every device) uses VM's
// Kernel, Initrd, Cmdline, Disks, Vsock and Console; the other slices run
// vCPUs and serve guest pages.
type SliceConfig struct {
	VM        Config
	Transport dsm.TransportConfig
	Placement [][]int
	// Hold is the coherence hold window (dsm.NodeConfig.Hold).
	Hold time.Duration
	// VCPUNice: dsm.SliceConfig.VCPUNice.
	VCPUNice int
	// TimerSlack: dsm.SliceConfig.TimerSlack.
	TimerSlack time.Duration
	// ReplicateKernelTables: dsm.SliceConfig.ReplicateKernelTables.
	ReplicateKernelTables bool
	// ProfileEvery: dsm.SliceConfig.ProfileEvery; the profile's addresses
	// are named from the kernel's symbol table when VM.Kernel has one.
	ProfileEvery time.Duration
	// StatsEvery and OnStats: dsm.SliceConfig's (the counters over time).
	StatsEvery time.Duration
	OnStats    func(dsm.StatsSnapshot)
	// NUMA describes each slice that runs vCPUs as a NUMA node of the guest
	// (numaBySlice). Off by default: with nohz_full on the other slices'
	// vCPUs, Linux leaves those out of idle load balancing, so new threads
	// reach them only by fork placement, which NUMA distances above the
	// reclaim distance turn off (measured: docs/dsm.md, "Status").
	NUMA bool
}

// RunSlice runs one slice until the guest powers off or resets (on every
// slice at once), a slice fails, or ctx ends.
func RunSlice(ctx context.Context, sc SliceConfig) (dsm.SliceResult, error) {
	cfg := sc.VM
	ncpu, err := dsm.CheckPlacement(sc.Placement, len(sc.Transport.Addrs))
	if err != nil {
		return dsm.SliceResult{}, fmt.Errorf("placement: %w", err)
	}
	if err := CheckBootPlacement(sc.Placement); err != nil {
		return dsm.SliceResult{}, err
	}
	cfg.CPUs = ncpu
	if sc.Transport.ID == 0 {
		// Slice 0 reads the kernel and disks and writes the command line.
		if err := cfg.Validate(); err != nil {
			return dsm.SliceResult{}, err
		}
		if cfg.Cmdline, err = withTSCFrequency(cfg.Cmdline); err != nil {
			return dsm.SliceResult{}, err
		}
		cfg.Cmdline = withSpreadSettings(cfg.Cmdline, sc.Placement)
		if cfg.VsockConnectTimeout == 0 {
			cfg.VsockConnectTimeout = SpreadVsockConnectTimeout
		}
		if sc.NUMA {
			cfg.NUMA = numaBySlice(sc.Placement)
		}
	} else if err := cfg.validateMem(); err != nil {
		return dsm.SliceResult{}, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	// No 8259 pair: the slices emulate the local APICs and the IOAPIC.
	legacy := legacyDevices
	legacy.NoPIC = true
	console := &panicWatch{w: cfg.Console}
	var devs *devices
	defer func() {
		if devs != nil {
			devs.Close()
		}
	}()
	res, err := dsm.RunSlice(ctx, dsm.SliceConfig{
		Transport: sc.Transport,
		Placement: sc.Placement,
		Hold:      sc.Hold,
		MemBytes:  cfg.MemBytes,
		// The kernel's static page tables (docs/dsm.md).
		ReplicateKernelTables: sc.ReplicateKernelTables,
		ProfileEvery:          sc.ProfileEvery,
		StatsEvery:            sc.StatsEvery,
		OnStats:               sc.OnStats,
		VCPUNice:              sc.VCPUNice,
		TimerSlack:            sc.TimerSlack,
		Loader:                newLoader(&cfg, legacy),
		Setup: func(h *dsm.Home) error {
			p := platform{io: &h.Machine.IO, mmio: &h.Machine.MMIO, mem: h.Memory,
				irq:      func(gsi uint32) (bus.Interrupt, error) { return h.IOAPIC.Line(int(gsi)), nil },
				poweroff: func() { h.Stop(machine.ExitPoweroff, "guest powered off") },
				reset:    func() { h.Stop(machine.ExitReset, "guest requested a reset (reboot)") }}
			var err error
			devs, err = attachDevices(p, &cfg, console)
			return err
		},
		Logger: cfg.Logger,
	})
	res.Exit = console.explain(res.Exit)
	if res.Profile != nil && cfg.Kernel != "" {
		if syms, serr := boot.LoadSymbols(cfg.Kernel); serr != nil {
			cfg.Logger.Info("RIP profile left unnamed", "err", serr)
		} else {
			for i := range res.Profile.Top {
				res.Profile.Top[i].Symbol = syms.Lookup(res.Profile.Top[i].RIP)
			}
		}
	}
	return res, err
}

// withTSCFrequency appends tsc_early_khz= (unless the command line sets it):
// a distributed guest has no kvmclock (it would bypass page coherence, see
// vmm/machine's CPUID), no PIT and no HPET, so Linux cannot measure the
// TSC and would mark it unusable, leaving no clock and no timer. Every
// slice's guest TSC counts at this rate (vmm/dsm, guest time).
func withTSCFrequency(cmdline string) (string, error) {
	if strings.Contains(" "+cmdline, " tsc_early_khz=") {
		return cmdline, nil
	}
	sys, err := kvm.Open()
	if err != nil {
		return "", err
	}
	defer sys.Close()
	khz, err := sys.TSCKHz()
	if err != nil {
		return "", fmt.Errorf("the TSC frequency for the guest: %w", err)
	}
	return fmt.Sprintf("%s tsc_early_khz=%d", cmdline, khz), nil
}

// SpreadVsockConnectTimeout is how long a spread guest gets to accept a
// host's vsock connection. A guest on one node answers in milliseconds
// (2 s is the device's default, as Firecracker's); a spread one, whose
// agent waits for pages from other nodes, took longer than 2 s in virt
// nodes and the launcher's "staging the job script" failed with the
// connection closed before any reply (2026-12-03, debian12 on 2 nodes).
const SpreadVsockConnectTimeout = time.Minute

// spreadSettings are kernel command-line settings for a guest spread over
// slices, each found by measuring where such a guest's boot spends its
// page hand-offs (docs/dsm.md, "Linux guests"). The user's own value of a
// parameter wins.
var spreadSettings = []struct{ param, value string }{
	// 256 legacy BSD ptys mean 512 character devices registered at boot,
	// each a devtmpfs node made by kdevtmpfsd, a kernel thread the
	// scheduler runs on whichever vCPU is idle: in a spread guest, the
	// other slice's. Nothing uses them (Unix98 ptys are /dev/pts).
	{"pty.legacy_count", "0"},
	// RCU's stall warnings, at the default 21 s, fire over and over in a
	// guest whose pages cross nodes, and each is printed on the 8250 with
	// interrupts off: from a vCPU on another slice every byte is a port
	// write forwarded to slice 0. Stopped debian12 guests had a vCPU in
	// io_serial_out doing that (docs/dsm.md, Status, session 10). 300 s
	// is the kernel's maximum: real stalls are still reported.
	{"rcupdate.rcu_cpu_stall_timeout", "300"},
	// The slices give every vCPU one TSC (docs/dsm.md, "Guest time") and
	// there is no kvmclock. Without this the clocksource watchdog checks
	// the TSC against a reference (the ACPI PM timer, a port forwarded to
	// slice 0, or jiffies, late whenever the home vCPU's tick is): in a
	// spread guest the skew can look huge, the TSC be marked unstable, the
	// clocksource switched under stop_machine (a debian12 guest's
	// migration/0 "soft lockup" for 23 s), and an unstable sched_clock
	// keeps every vCPU's tick running in spite of nohz_full. With it the
	// debian12 job ran twice as fast.
	{"tsc", "reliable"},
}

// withSpreadSettings appends the spreadSettings the command line does not
// set and, when other slices run vCPUs too:
//   - maxcpus=<home slice's vCPUs> (if they are vCPUs 0..k-1, as the
//     launcher places them): the kernel boots on the home slice alone, with
//     no page traffic between slices, and leaves the others present but
//     offline for the guest to bring up once booted (the test /init and the
//     launcher do). A boot spread from the start took longer than 30
//     minutes in virt nodes.
//   - nohz_full=<the other slices' vCPUs>: the timekeeping duty stays on
//     the home slice (with plain NO_HZ it moves to whichever vCPU ticks
//     while the holder idles, and jiffies and the timekeeper then move
//     between slices every tick), and a remote vCPU running one task stops
//     its tick. Kernels without CONFIG_NO_HZ_FULL ignore it.
//
// The user's own values win (docs/dsm.md, "Linux guests").
func withSpreadSettings(cmdline string, placement [][]int) string {
	set := func(param, value string) {
		if !strings.Contains(" "+cmdline, " "+param+"=") {
			cmdline += " " + param + "=" + value
		}
	}
	for _, s := range spreadSettings {
		set(s.param, s.value)
	}
	var others []int
	for _, cpus := range placement[1:] {
		others = append(others, cpus...)
	}
	if len(others) == 0 {
		return cmdline
	}
	home := slices.Sorted(slices.Values(placement[0]))
	if home[len(home)-1] == len(home)-1 {
		set("maxcpus", strconv.Itoa(len(home)))
	}
	set("nohz_full", cpuList(others))
	return cmdline
}

// cpuList formats CPU ids the way the kernel's cpulist parameters take
// them: sorted, runs as ranges ("1-3,7").
func cpuList(cpus []int) string {
	c := slices.Sorted(slices.Values(cpus))
	var parts []string
	for i := 0; i < len(c); {
		j := i
		for j+1 < len(c) && c[j+1] == c[j]+1 {
			j++
		}
		if j > i {
			parts = append(parts, fmt.Sprintf("%d-%d", c[i], c[j]))
		} else {
			parts = append(parts, strconv.Itoa(c[i]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

// numaBySlice describes each slice that runs vCPUs as a NUMA node of the
// guest (nil if only one does): Linux then keeps forked, exec'd and woken
// tasks on their slice and moves running ones across only when the load
// is unbalanced (acpi.RemoteDistance), and allocates a task's memory from
// its own node's share of RAM (docs/dsm.md, "Linux guests").
func numaBySlice(placement [][]int) [][]int {
	var nodes [][]int
	for _, cpus := range placement {
		if len(cpus) > 0 {
			nodes = append(nodes, cpus)
		}
	}
	if len(nodes) < 2 {
		return nil
	}
	return nodes
}

// CheckBootPlacement checks what a Linux guest adds to dsm.CheckPlacement:
// the boot processor starts at the kernel entry the loader computed, which
// only slice 0 has.
func CheckBootPlacement(placement [][]int) error {
	if len(placement) == 0 || !slices.Contains(placement[0], 0) {
		return errors.New("placement: vCPU 0 (the boot processor) must be on slice 0")
	}
	return nil
}
