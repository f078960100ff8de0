// Package boot loads a Linux kernel into guest memory and describes how the
// boot vCPU must be set up to enter it.
//
// Two formats are accepted: a bzImage (x86 boot protocol, entered at its
// 64-bit entry point in long mode) and an ELF vmlinux carrying a PVH entry
// note (entered in 32-bit protected mode with paging off). Load also writes
// the ACPI tables (package acpi) so the kernel finds the CPUs, the IOAPIC
// the virtio-mmio devices, and the PM1a control and reset registers.
package boot

import (
	"bytes"
	"fmt"
	"os"

	"github.com/hpcvm/hpcvm/vmm/boot/acpi"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Region is one range of guest RAM.
type Region struct {
	Start, Size uint64
}

// End is the first address past the region.
func (r Region) End() uint64 { return r.Start + r.Size }

// RAMRegions is the RAM map of a guest with size bytes of memory:
// [0, min(size, MMIOGapStart)) and, for the rest, a range from 4 GiB.
func RAMRegions(size uint64) []Region {
	low := min(size, uint64(layout.MMIOGapStart))
	r := []Region{{0, low}}
	if size > low {
		r = append(r, Region{layout.MMIOGapEnd, size - low})
	}
	return r
}

// Config says what to boot.
type Config struct {
	// Kernel is the kernel image; if nil it is read from KernelPath.
	Kernel     []byte
	KernelPath string
	// Initrd is the initial ramdisk; if nil it is read from InitrdPath,
	// and if that is empty too there is none.
	Initrd     []byte
	InitrdPath string
	Cmdline    string
	// RAM is the guest RAM map, e.g. RAMRegions(size). The first region
	// must start at 0 and reach past 1 MiB.
	RAM []Region
	// CPUs is the number of vCPUs listed in the ACPI MADT.
	CPUs int
	// Legacy says which legacy PC devices the VMM emulates (for the FADT).
	Legacy acpi.Legacy
	// Devices are the virtio-mmio devices described in the DSDT.
	Devices []acpi.MMIODevice
	// NUMA, if set, lists the vCPUs of each NUMA node; RAM is shared out
	// among the nodes in address order (ACPI SRAT and SLIT).
	NUMA [][]int
}

// Protocol is how the kernel is entered.
type Protocol int

const (
	// BzImage64 is the x86 boot protocol's 64-bit entry: long mode,
	// identity-mapped page tables, RSI = struct boot_params.
	BzImage64 Protocol = iota + 1
	// PVH is the Xen PVH entry: 32-bit protected mode, paging off,
	// EBX = struct hvm_start_info.
	PVH
)

func (p Protocol) String() string {
	switch p {
	case BzImage64:
		return "bzImage (64-bit boot protocol)"
	case PVH:
		return "PVH"
	}
	return fmt.Sprintf("Protocol(%d)", int(p))
}

// Entry is the result of Load: where the kernel starts and what the boot
// vCPU's registers must hold. Only the bootstrap processor needs it; Linux
// starts the others with INIT/SIPI through the in-kernel local APIC.
type Entry struct {
	Protocol Protocol
	// IP is the guest-physical entry point.
	IP uint64
	// BootInfo is the address of struct boot_params (RSI, BzImage64) or
	// struct hvm_start_info (EBX, PVH).
	BootInfo uint64
	// RSDP is the address of the ACPI RSDP.
	RSDP uint64
	// Kernel is the guest memory the kernel occupies, including (for a
	// bzImage) the area it decompresses into.
	Kernel Region
	// Initrd is where the initrd was placed (Size 0 if none).
	Initrd Region
}

// Load detects the kernel's format, copies the kernel and initrd into mem,
// writes the boot information, command line, boot GDT, page tables and ACPI
// tables, and returns how to enter the kernel.
func Load(mem memory.Guest, cfg Config) (*Entry, error) {
	kernel, kname, err := readInput(cfg.Kernel, cfg.KernelPath, "kernel")
	if err != nil {
		return nil, err
	}
	if kernel == nil {
		return nil, fmt.Errorf("no kernel given (Config.Kernel and Config.KernelPath are empty)")
	}
	initrd, iname, err := readInput(cfg.Initrd, cfg.InitrdPath, "initrd")
	if err != nil {
		return nil, err
	}
	ram, err := checkRAM(mem, cfg.RAM)
	if err != nil {
		return nil, err
	}
	l := &loader{mem: mem, ram: ram, cfg: &cfg, kernel: kernel, kname: kname, initrd: initrd, iname: iname}
	switch {
	case isBzImage(kernel):
		return l.loadBzImage()
	case bytes.HasPrefix(kernel, []byte(elfMagic)):
		return l.loadPVH()
	}
	return nil, fmt.Errorf("%s: not a bzImage (no \"HdrS\" magic at %#x) nor an ELF file", kname, hdrMagicOff)
}

// readInput returns data, or the contents of path; what names it in errors.
func readInput(data []byte, path, what string) ([]byte, string, error) {
	name := what + " " + path
	if data != nil {
		if path == "" {
			name = what + " (in memory)"
		}
		return data, name, nil
	}
	if path == "" {
		return nil, what, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, name, fmt.Errorf("reading %s: %w", what, err)
	}
	return b, name, nil
}

// checkRAM validates the RAM map against mem and the layout; it returns
// the map with the low region first.
func checkRAM(mem memory.Guest, ram []Region) ([]Region, error) {
	if len(ram) == 0 {
		return nil, fmt.Errorf("no guest RAM regions given (Config.RAM is empty)")
	}
	var total uint64
	for i, r := range ram {
		if r.Size == 0 || r.End() < r.Start {
			return nil, fmt.Errorf("RAM region %d [%#x, +%#x) is empty or wraps", i, r.Start, r.Size)
		}
		if r.Start < layout.MMIOGapEnd && r.End() > layout.MMIOGapStart {
			return nil, fmt.Errorf("RAM region %d [%#x, %#x) overlaps the MMIO gap [%#x, %#x)",
				i, r.Start, r.End(), uint64(layout.MMIOGapStart), uint64(layout.MMIOGapEnd))
		}
		for j := range i {
			if o := ram[j]; r.Start < o.End() && o.Start < r.End() {
				return nil, fmt.Errorf("RAM regions %d and %d overlap", j, i)
			}
		}
		total += r.Size
	}
	if total != mem.Size() {
		return nil, fmt.Errorf("RAM regions total %#x bytes but guest memory has %#x", total, mem.Size())
	}
	if ram[0].Start != 0 {
		return nil, fmt.Errorf("first RAM region starts at %#x, not 0", ram[0].Start)
	}
	// The boot data below 1 MiB and the kernel at 1 MiB need at least
	// a little low RAM; the real requirement is checked per kernel.
	if ram[0].End() <= layout.HighMemStart {
		return nil, fmt.Errorf("low RAM ends at %#x, below the kernel load address %#x", ram[0].End(), uint64(layout.HighMemStart))
	}
	return ram, nil
}

// loader carries one Load call's state.
type loader struct {
	mem    memory.Guest
	ram    []Region
	cfg    *Config
	kernel []byte
	kname  string
	initrd []byte
	iname  string
}

// lowEnd is the end of RAM below the MMIO gap.
func (l *loader) lowEnd() uint64 { return l.ram[0].End() }

// write copies b to guest-physical addr, naming what on failure.
func (l *loader) write(addr uint64, b []byte, what string) error {
	if _, err := l.mem.WriteAt(b, int64(addr)); err != nil {
		return fmt.Errorf("writing %s at %#x: %w", what, addr, err)
	}
	return nil
}

// zero clears [addr, addr+n) in chunks, so a large BSS costs no big buffer.
func (l *loader) zero(addr, n uint64, what string) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, uint64(len(buf)))
		if err := l.write(addr, buf[:c], what); err != nil {
			return err
		}
		addr += c
		n -= c
	}
	return nil
}

// inRAM reports whether [start, start+size) lies inside one RAM region.
func (l *loader) inRAM(start, size uint64) bool {
	for _, r := range l.ram {
		if start >= r.Start && start-r.Start <= r.Size && size <= r.End()-start {
			return true
		}
	}
	return false
}

// placeInitrd puts the initrd page-aligned as high as possible below limit
// (exclusive) and above kernelEnd; it returns the region used (Size 0 if
// there is no initrd).
func (l *loader) placeInitrd(limit, kernelEnd uint64) (Region, error) {
	if len(l.initrd) == 0 {
		return Region{}, nil
	}
	limit = min(limit, l.lowEnd(), uint64(layout.MMIOGapStart))
	size := uint64(len(l.initrd))
	if size > limit {
		return Region{}, fmt.Errorf("%s (%d bytes) is larger than the usable low RAM below %#x", l.iname, size, limit)
	}
	addr := (limit - size) &^ (memory.PageSize - 1)
	if addr < kernelEnd {
		return Region{}, fmt.Errorf("%s (%d bytes) does not fit in RAM between the kernel's end %#x and %#x; give the guest more memory",
			l.iname, size, kernelEnd, limit)
	}
	if err := l.write(addr, l.initrd, l.iname); err != nil {
		return Region{}, err
	}
	return Region{addr, size}, nil
}

// writeCmdline stores the NUL-terminated command line at CmdlineAddr;
// max is the longest length the kernel accepts (without the NUL).
func (l *loader) writeCmdline(max uint64) error {
	max = min(max, layout.CmdlineMaxSize-1)
	if n := uint64(len(l.cfg.Cmdline)); n > max {
		return fmt.Errorf("kernel command line is %d bytes; this kernel accepts at most %d", n, max)
	}
	if bytes.IndexByte([]byte(l.cfg.Cmdline), 0) >= 0 {
		return fmt.Errorf("kernel command line contains a NUL byte")
	}
	return l.write(layout.CmdlineAddr, append([]byte(l.cfg.Cmdline), 0), "kernel command line")
}

// writeACPI writes the ACPI tables and returns the RSDP address.
func (l *loader) writeACPI() (uint64, error) {
	nodes, err := numaNodes(l.cfg.RAM, l.cfg.NUMA)
	if err != nil {
		return 0, err
	}
	return acpi.Write(l.mem, acpi.Config{CPUs: l.cfg.CPUs, Legacy: l.cfg.Legacy, Devices: l.cfg.Devices, NUMA: nodes})
}

// E820 memory types (also used by the PVH memory map).
const (
	e820RAM      = 1
	e820Reserved = 2
)

type e820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// memoryMap is the guest's e820 map: RAM with [EBDAStart, 1 MiB) carved
// out as reserved (EBDA, ACPI tables, BIOS area).
func (l *loader) memoryMap() []e820Entry {
	var m []e820Entry
	for _, r := range l.ram {
		if r.Start < layout.HighMemStart {
			if r.Start < layout.EBDAStart {
				m = append(m, e820Entry{r.Start, layout.EBDAStart - r.Start, e820RAM})
			}
			m = append(m, e820Entry{max(r.Start, layout.EBDAStart), layout.HighMemStart - max(r.Start, layout.EBDAStart), e820Reserved})
			m = append(m, e820Entry{layout.HighMemStart, r.End() - layout.HighMemStart, e820RAM})
			continue
		}
		m = append(m, e820Entry{r.Start, r.Size, e820RAM})
	}
	return m
}
