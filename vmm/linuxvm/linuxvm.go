// Package linuxvm runs a Linux guest on one node: it loads the kernel with
// vmm/boot, builds the machine (vmm/machine) with the in-kernel irqchip, and
// attaches the standard devices: 8250 console, virtio-blk disks,
// virtio-vsock, the boot timer, and the ACPI power and reset registers.
package linuxvm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hpcvm/hpcvm/internal/units"
	"github.com/hpcvm/hpcvm/vmm/boot"
	"github.com/hpcvm/hpcvm/vmm/boot/acpi"
	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// DefaultCmdline is used when the user gives none. panic=-1 turns a guest
// panic into an immediate reset, which the VMM reports as a failure.
const DefaultCmdline = "console=ttyS0 panic=-1"

// Virtio devices are numbered disks first, then vsock; device i has window
// layout.VirtioMMIOAddr(i) and interrupt layout.VirtioIRQ(i).

// Limits checked by Validate.
const (
	MinMemBytes = 32 << 20
	MaxCPUs     = 254 // xAPIC ids in the MADT; 255 is broadcast
)

// Disk is a virtio-blk disk on a raw image.
type Disk struct {
	Path     string
	ReadOnly bool
	// Overlay makes the disk copy-on-write: Path is never written, the
	// guest's writes go to this new file (see blk.Config.Overlay).
	Overlay string
}

// Config describes a Linux VM.
type Config struct {
	Kernel, Initrd string
	Cmdline        string
	CPUs           int
	MemBytes       uint64
	Disks          []Disk
	// VsockPath is the hybrid vsock Unix socket; empty for no vsock device.
	VsockPath string
	VsockCID  uint32
	// VsockConnectTimeout bounds how long a host client's CONNECT waits
	// for the guest to accept (vsock.Config.ConnectTimeout; 2 s if zero,
	// a spread guest's slice 0 uses SpreadVsockConnectTimeout).
	VsockConnectTimeout time.Duration
	Console             io.Writer // serial output
	ConsoleIn           io.Reader // serial input; nil for none
	Logger              *slog.Logger
	// OnUserspace is called once when the guest writes the boot timer.
	OnUserspace func(sinceStart string)
	// NUMA, if set, lists the vCPUs of each NUMA node the guest is told
	// of (a VM spread over slices: one node per slice; RunSlice sets it).
	NUMA [][]int
}

// Validate checks the configuration and names the first problem found.
func (c *Config) Validate() error {
	if c.Kernel == "" {
		return errors.New("--kernel is required")
	}
	if err := regularFile("--kernel", c.Kernel); err != nil {
		return err
	}
	if c.Initrd != "" {
		if err := regularFile("--initrd", c.Initrd); err != nil {
			return err
		}
	}
	for _, d := range c.Disks {
		if err := regularFile("--disk", d.Path); err != nil {
			return err
		}
	}
	if c.CPUs < 1 {
		return fmt.Errorf("--cpus %d: need at least 1", c.CPUs)
	}
	if c.CPUs > MaxCPUs {
		return fmt.Errorf("--cpus %d: at most %d vCPUs are supported", c.CPUs, MaxCPUs)
	}
	if err := c.validateMem(); err != nil {
		return err
	}
	if c.VsockPath != "" {
		dir := filepath.Dir(c.VsockPath)
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return fmt.Errorf("--vsock %s: directory %s does not exist", c.VsockPath, dir)
		}
		if st, err := os.Lstat(c.VsockPath); err == nil && st.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("--vsock %s: exists and is not a socket", c.VsockPath)
		}
	}
	return nil
}

// validateMem checks the guest memory size (every slice of a distributed
// VM checks it; only slice 0 reads the kernel and disks).
func (c *Config) validateMem() error {
	if c.MemBytes < MinMemBytes {
		return fmt.Errorf("--mem %s: too small, a Linux guest needs at least %s", units.FormatSize(c.MemBytes), units.FormatSize(MinMemBytes))
	}
	if c.MemBytes%memory.PageSize != 0 {
		return fmt.Errorf("--mem %d: not a multiple of the %d-byte page size", c.MemBytes, memory.PageSize)
	}
	if host, err := hostMemory(); err == nil && c.MemBytes > host {
		return fmt.Errorf("--mem %s: more than this host's %s of memory", units.FormatSize(c.MemBytes), units.FormatSize(host))
	}
	return nil
}

func regularFile(flag, path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s %s: %w", flag, path, errors.Unwrap(err))
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s %s: not a regular file", flag, path)
	}
	return nil
}

// hostMemory reads MemTotal from /proc/meminfo.
func hostMemory() (uint64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		var kb uint64
		if n, _ := fmt.Sscanf(s.Text(), "MemTotal: %d kB", &kb); n == 1 {
			return kb << 10, nil
		}
	}
	return 0, errors.New("MemTotal not found in /proc/meminfo")
}

// newLoader loads cfg's kernel. Virtio devices are described in the ACPI
// DSDT (as Firecracker and QEMU microvm do), not with virtio_mmio.device=
// on the command line: distribution kernels such as Debian's are built
// without that option.
func newLoader(cfg *Config, legacy acpi.Legacy) *loader {
	var acpiDevs []acpi.MMIODevice
	nvirtio := len(cfg.Disks)
	if cfg.VsockPath != "" {
		nvirtio++
	}
	for i := 0; i < nvirtio; i++ {
		acpiDevs = append(acpiDevs, acpi.MMIODevice{Addr: layout.VirtioMMIOAddr(i), Size: layout.VirtioMMIOSize, IRQ: layout.VirtioIRQ(i)})
	}
	return &loader{cfg: boot.Config{KernelPath: cfg.Kernel, InitrdPath: cfg.Initrd, Cmdline: strings.TrimSpace(cfg.Cmdline), Legacy: legacy, Devices: acpiDevs, NUMA: cfg.NUMA}}
}

// loader adapts vmm/boot to machine.Loader.
type loader struct {
	cfg   boot.Config
	entry *boot.Entry
}

func (l *loader) Load(mem *memory.RAM, ncpu int) error {
	for _, r := range mem.Regions() {
		l.cfg.RAM = append(l.cfg.RAM, boot.Region{Start: r.GPA, Size: uint64(len(r.Host))})
	}
	l.cfg.CPUs = ncpu
	e, err := boot.Load(mem, l.cfg)
	if err != nil {
		return err
	}
	l.entry = e
	return nil
}

func (l *loader) SetupVCPU(id, ncpu int, regs *kvm.Regs, sregs *kvm.Sregs) bool {
	if id != 0 {
		return false // application processors wait for INIT/SIPI
	}
	l.entry.SetupRegisters(regs, sregs)
	return true
}

// panicWatch passes console output through and remembers whether the guest
// printed a kernel panic, so a panic-triggered reset is reported as a panic.
type panicWatch struct {
	w    io.Writer
	tail []byte
	seen bool
}

const panicMarker = "Kernel panic - not syncing"

// explain reports a reset that followed a kernel panic as a panic.
func (p *panicWatch) explain(e machine.Exit) machine.Exit {
	if e.Kind == machine.ExitReset && p.seen {
		e.Kind = machine.ExitPanic
		e.Reason = "guest kernel panic (see console)"
	}
	return e
}

func (p *panicWatch) Write(b []byte) (int, error) {
	if !p.seen {
		p.tail = append(p.tail, b...)
		if strings.Contains(string(p.tail), panicMarker) {
			p.seen = true
			p.tail = nil
		} else if len(p.tail) > 256 {
			p.tail = append([]byte(nil), p.tail[len(p.tail)-len(panicMarker):]...)
		}
	}
	return p.w.Write(b)
}

// Run boots the guest and blocks until it powers off, resets, fails, or ctx
// is cancelled (then the guest is stopped). An error means the VM could not
// be created.
func Run(ctx context.Context, cfg Config) (machine.Exit, error) {
	if err := cfg.Validate(); err != nil {
		return machine.Exit{}, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	m, err := machine.New(machine.Config{CPUs: cfg.CPUs, MemBytes: cfg.MemBytes, InKernelIRQChip: true, Loader: newLoader(&cfg, legacyDevices), Logger: cfg.Logger})
	if err != nil {
		return machine.Exit{}, err
	}
	defer m.Close()
	console := &panicWatch{w: cfg.Console}
	devs, err := attachDevices(machinePlatform(m), &cfg, console)
	if err != nil {
		return machine.Exit{}, err
	}
	defer devs.Close()
	return console.explain(m.Run(ctx)), nil
}
