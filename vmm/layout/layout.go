// Package layout is the guest physical address map and fixed resources
// (ports, IRQ lines) of an hpcvm x86-64 machine. Loaders, ACPI tables and
// devices all take their addresses from here so they can never disagree.
package layout

// Guest physical memory map.
const (
	// Low memory used by the boot path (all below 1 MiB).
	GDTAddr        = 0x500   // boot GDT
	PVHStartInfo   = 0x6000  // hvm_start_info for PVH boot
	PVHMemmap      = 0x6400  // hvm_memmap_table_entry array for PVH boot
	ZeroPageAddr   = 0x7000  // struct boot_params for bzImage boot
	PML4Addr       = 0x9000  // identity page tables for 64-bit entry
	PDPTAddr       = 0xA000  //
	PDAddr         = 0xB000  // 4 pages: 2 MiB pages identity-mapping 0..4 GiB
	BootStackTop   = 0x8FF0  // initial RSP
	CmdlineAddr    = 0x20000 // kernel command line
	CmdlineMaxSize = 0x10000
	EBDAStart      = 0x9FC00 // start of the reserved area below 1 MiB
	ACPITablesAddr = 0xE0000 // RSDP (found by the BIOS-area scan) and tables
	ACPITablesSize = 0x20000
	HighMemStart   = 0x100000 // 1 MiB: kernel load address

	// MMIOGapStart..4GiB is never RAM: device windows, IOAPIC, LAPIC.
	MMIOGapStart = 0xC0000000
	MMIOGapEnd   = 0x100000000

	// VirtioMMIOBase is the first virtio-mmio window; device i is at
	// VirtioMMIOBase + i*VirtioMMIOSize with interrupt VirtioIRQBase + i.
	VirtioMMIOBase = 0xD0000000
	VirtioMMIOSize = 0x1000
	VirtioMaxDevs  = 8

	// BootTimerAddr is the boot-timer device: a guest write of
	// BootTimerMagic marks "userspace reached".
	BootTimerAddr  = 0xD1000000
	BootTimerSize  = 0x1000
	BootTimerMagic = 123

	IOAPICAddr = 0xFEC00000
	LAPICAddr  = 0xFEE00000
)

// Port I/O and interrupt lines.
const (
	COM1Port = 0x3F8
	COM1IRQ  = 4

	I8042DataPort    = 0x60
	I8042CommandPort = 0x64

	// ACPI fixed-hardware power management registers (FADT). hpcvm uses
	// full (not hardware-reduced) ACPI: in hardware-reduced mode Linux
	// drops the legacy PIC and with it the mapping of ISA IRQs 0-15, which
	// the serial port and the command-line virtio-mmio devices use.
	ACPIPM1aEventPort   = 0x600 // PM1a_EVT_BLK: status (2 bytes), enable (2 bytes)
	ACPIPM1aEventLen    = 4
	ACPIPM1aControlPort = 0x604 // PM1a_CNT_BLK: SCI_EN bit 0, SLP_TYP bits 10-12, SLP_EN bit 13
	ACPIPM1aControlLen  = 2
	ACPIResetPort       = 0x608
	ACPIResetValue      = 0x01
	ACPISCIIRQ          = 9
	ACPIS5SleepType     = 5 // value of \_S5_ in the DSDT

	VirtioIRQBase = 5 // GSIs 5..12; 9 is skipped (SCI)
)

// VirtioIRQ returns the GSI of virtio-mmio device i.
func VirtioIRQ(i int) uint32 {
	irq := uint32(VirtioIRQBase + i)
	if irq >= ACPISCIIRQ {
		irq++
	}
	return irq
}

// VirtioMMIOAddr returns the base address of virtio-mmio device i.
func VirtioMMIOAddr(i int) uint64 { return VirtioMMIOBase + uint64(i)*VirtioMMIOSize }
