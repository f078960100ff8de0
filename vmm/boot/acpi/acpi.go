// Package acpi builds the guest's ACPI tables: RSDP, RSDT/XSDT, a full
// (not hardware-reduced) FADT with PM1a event/control blocks and a FACS, a
// DSDT with \_S5_ (so poweroff reaches the VMM through PM1a_CNT) and the
// virtio-mmio devices, a MADT listing the vCPUs and the IOAPIC and, for a
// NUMA guest, an SRAT and a SLIT. The tables are written at layout.ACPITablesAddr, inside the BIOS
// area Linux scans for the RSDP.
package acpi

import (
	"encoding/binary"
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// MaxCPUs is the largest vCPU count the MADT can describe: xAPIC ids
// 0..254 in Local APIC entries (255 is the broadcast id; more would need
// x2APIC entries).
const MaxCPUs = 255

// Legacy says which legacy PC devices the VMM emulates; the FADT's
// IAPC_BOOT_ARCH flags tell Linux not to probe the absent ones.
type Legacy struct {
	I8042   bool // keyboard controller at ports 0x60/0x64
	CMOSRTC bool // MC146818 RTC at ports 0x70/0x71
	// NoPIC: there is no 8259 pair (a distributed VM's userspace
	// interrupt controllers); the MADT then does not claim PC-AT
	// compatibility and Linux runs with its null legacy PIC.
	NoPIC bool
}

// MMIODevice is a virtio-mmio device window and its interrupt (a GSI).
type MMIODevice struct {
	Addr, Size uint64
	IRQ        uint32
}

// Config describes the machine the tables advertise.
type Config struct {
	CPUs   int
	Legacy Legacy
	// Devices are described in the DSDT as virtio-mmio devices
	// ("LNRO0005"), the way guests without virtio_mmio.device= on their
	// command line (Debian's kernels among them) discover them.
	Devices []MMIODevice
	// NUMA, if set, describes the guest's NUMA nodes (SRAT and SLIT);
	// every vCPU must be in one node.
	NUMA []NUMANode
}

// Table signatures and identification.
const (
	oemID      = "HPCVM "
	oemTableID = "HPCVMACP"
	creatorID  = "HPCV"
	headerSize = 36
	rsdpSize   = 36
	fadtSize   = 276 // ACPI 6.x FADT
)

// Build lays the tables out for placement at base and returns them as one
// blob whose first 36 bytes are the RSDP.
func Build(cfg Config, base uint64) ([]byte, error) {
	if cfg.CPUs < 1 || cfg.CPUs > MaxCPUs {
		return nil, fmt.Errorf("ACPI: %d vCPUs; the MADT supports 1..%d", cfg.CPUs, MaxCPUs)
	}
	if base%16 != 0 || base+layout.ACPITablesSize > 1<<32 {
		return nil, fmt.Errorf("ACPI tables base %#x is not 16-byte aligned below 4 GiB", base)
	}
	if err := checkNUMA(cfg.NUMA, cfg.CPUs); err != nil {
		return nil, err
	}
	dsdt, err := dsdt(cfg.Devices)
	if err != nil {
		return nil, err
	}
	madt := madt(cfg.CPUs, !cfg.Legacy.NoPIC)
	// Layout: RSDP, then each table 16-byte aligned.
	var blob []byte
	place := func(b []byte) uint64 {
		for len(blob)%16 != 0 {
			blob = append(blob, 0)
		}
		addr := base + uint64(len(blob))
		blob = append(blob, b...)
		return addr
	}
	blob = make([]byte, rsdpSize)
	for len(blob)%64 != 0 { // the FACS must be 64-byte aligned
		blob = append(blob, 0)
	}
	facsAddr := base + uint64(len(blob))
	blob = append(blob, facs()...)
	dsdtAddr := place(dsdt)
	fadtAddr := place(fadt(cfg.Legacy, dsdtAddr, facsAddr))
	madtAddr := place(madt)
	tables := []uint64{fadtAddr, madtAddr}
	if len(cfg.NUMA) > 0 {
		tables = append(tables, place(srat(cfg.NUMA)), place(slit(len(cfg.NUMA))))
	}
	xsdtAddr := place(xsdt(tables))
	rsdtAddr := place(rsdt(tables))
	copy(blob, rsdp(rsdtAddr, xsdtAddr))
	if len(blob) > layout.ACPITablesSize {
		return nil, fmt.Errorf("ACPI tables take %d bytes, more than the %d reserved", len(blob), layout.ACPITablesSize)
	}
	return blob, nil
}

// Write builds the tables and writes them to mem at layout.ACPITablesAddr;
// it returns the RSDP's address (the same).
func Write(mem memory.Guest, cfg Config) (uint64, error) {
	blob, err := Build(cfg, layout.ACPITablesAddr)
	if err != nil {
		return 0, err
	}
	if _, err := mem.WriteAt(blob, layout.ACPITablesAddr); err != nil {
		return 0, fmt.Errorf("writing ACPI tables at %#x: %w", layout.ACPITablesAddr, err)
	}
	return layout.ACPITablesAddr, nil
}

// Checksum is the byte that makes b sum to zero.
func Checksum(b []byte) uint8 {
	var s uint8
	for _, c := range b {
		s += c
	}
	return -s
}

// rsdp is the revision 2 Root System Description Pointer.
func rsdp(rsdtAddr, xsdtAddr uint64) []byte {
	b := make([]byte, rsdpSize)
	copy(b, "RSD PTR ")
	copy(b[9:], oemID)
	b[15] = 2 // revision: ACPI 2.0+, has XSDT
	binary.LittleEndian.PutUint32(b[16:], uint32(rsdtAddr))
	binary.LittleEndian.PutUint32(b[20:], rsdpSize)
	binary.LittleEndian.PutUint64(b[24:], xsdtAddr)
	b[8] = Checksum(b[:20])
	b[32] = Checksum(b)
	return b
}

// table prepends a system description header to body and checksums it.
func table(sig string, rev uint8, body []byte) []byte {
	b := make([]byte, headerSize+len(body))
	copy(b, sig)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(b)))
	b[8] = rev
	copy(b[10:], oemID)
	copy(b[16:], oemTableID)
	binary.LittleEndian.PutUint32(b[24:], 1) // OEM revision
	copy(b[28:], creatorID)
	binary.LittleEndian.PutUint32(b[32:], 1) // creator revision
	copy(b[headerSize:], body)
	b[9] = Checksum(b)
	return b
}

func xsdt(tables []uint64) []byte {
	body := make([]byte, 8*len(tables))
	for i, t := range tables {
		binary.LittleEndian.PutUint64(body[8*i:], t)
	}
	return table("XSDT", 1, body)
}

func rsdt(tables []uint64) []byte {
	body := make([]byte, 4*len(tables))
	for i, t := range tables {
		binary.LittleEndian.PutUint32(body[4*i:], uint32(t))
	}
	return table("RSDT", 1, body)
}

// Generic Address Structure address space ids and access sizes.
const (
	gasSystemIO  = 1
	gasByteAcces = 1
)

// gas encodes a Generic Address Structure for a byte-wide I/O port.
// gasWidth writes a SystemIO generic address of the given bit width.
func gasWidth(b []byte, port uint16, bits, access uint8) {
	gas(b, port)
	b[1] = bits
	b[3] = access
}

// facs is the Firmware ACPI Control Structure that full (non-reduced) ACPI
// requires; hpcvm has no firmware waking vector or global lock to offer.
func facs() []byte {
	b := make([]byte, facsSize)
	copy(b, "FACS")
	binary.LittleEndian.PutUint32(b[4:], facsSize)
	b[32] = facsVersion
	return b
}

func gas(b []byte, port uint16) {
	b[0] = gasSystemIO
	b[1] = 8 // register bit width
	b[2] = 0 // bit offset
	b[3] = gasByteAcces
	binary.LittleEndian.PutUint64(b[4:], uint64(port))
}

// FADT offsets (ACPI 6.5, table 5.9) and flags.
const (
	fadtDSDT          = 40
	fadtSCIInt        = 46
	fadtIAPCBootArch  = 109
	fadtFlags         = 112
	fadtResetReg      = 116
	fadtResetValue    = 128
	fadtMinorVersion  = 131
	fadtXDSDT         = 140
	fadtFirmwareCtrl  = 36
	fadtPM1aEvtBlk    = 56
	fadtPM1aCntBlk    = 64
	fadtPM1EvtLen     = 88
	fadtPM1CntLen     = 89
	fadtXFirmwareCtrl = 132
	fadtXPM1aEvtBlk   = 148
	fadtXPM1aCntBlk   = 172
	facsSize          = 64
	facsVersion       = 2
	gasWordAccess     = 2
	fadtHypervisorID  = 268
	fadtRevision      = 6
	fadtMinorRevision = 5

	bootArch8042     = 1 << 1
	bootArchNoVGA    = 1 << 2
	bootArchNoCMOS   = 1 << 5
	flagResetRegSup  = 1 << 10
	flagHWReducedACP = 1 << 20
)

// fadt is a full FADT: PM1a event and control blocks, no GPE blocks, a
// FACS and the reset register, all I/O ports the VMM traps (docs/boot.md
// says why not hardware-reduced mode).
func fadt(legacy Legacy, dsdtAddr, facsAddr uint64) []byte {
	b := make([]byte, fadtSize)
	binary.LittleEndian.PutUint32(b[fadtDSDT:], uint32(dsdtAddr))
	binary.LittleEndian.PutUint16(b[fadtSCIInt:], layout.ACPISCIIRQ)
	arch := uint16(bootArchNoVGA)
	if legacy.I8042 {
		arch |= bootArch8042
	}
	if !legacy.CMOSRTC {
		arch |= bootArchNoCMOS
	}
	binary.LittleEndian.PutUint16(b[fadtIAPCBootArch:], arch)
	// Full (not hardware-reduced) ACPI: Linux keeps the legacy PIC and
	// the ISA IRQ mappings the serial port and virtio-mmio devices need.
	// SMI_CMD = 0 means the machine is always in ACPI mode.
	binary.LittleEndian.PutUint32(b[fadtFlags:], flagResetRegSup)
	binary.LittleEndian.PutUint32(b[fadtFirmwareCtrl:], uint32(facsAddr))
	binary.LittleEndian.PutUint64(b[fadtXFirmwareCtrl:], facsAddr)
	binary.LittleEndian.PutUint32(b[fadtPM1aEvtBlk:], layout.ACPIPM1aEventPort)
	binary.LittleEndian.PutUint32(b[fadtPM1aCntBlk:], layout.ACPIPM1aControlPort)
	b[fadtPM1EvtLen] = layout.ACPIPM1aEventLen
	b[fadtPM1CntLen] = layout.ACPIPM1aControlLen
	gasWidth(b[fadtXPM1aEvtBlk:], layout.ACPIPM1aEventPort, 8*layout.ACPIPM1aEventLen, gasWordAccess)
	gasWidth(b[fadtXPM1aCntBlk:], layout.ACPIPM1aControlPort, 8*layout.ACPIPM1aControlLen, gasWordAccess)
	gas(b[fadtResetReg:], layout.ACPIResetPort)
	b[fadtResetValue] = layout.ACPIResetValue
	b[fadtMinorVersion] = fadtMinorRevision
	binary.LittleEndian.PutUint64(b[fadtXDSDT:], dsdtAddr)
	copy(b[fadtHypervisorID:], "HPCVM")
	return table("FACP", fadtRevision, b[headerSize:])
}

// MADT structure types and flags.
const (
	madtLocalAPIC      = 0
	madtIOAPIC         = 1
	madtIntOverride    = 2
	madtLocalAPICNMI   = 4
	madtPCATCompat     = 1 << 0
	madtLAPICEnabled   = 1 << 0
	madtRevision       = 5
	ioapicID           = 0
	mpsActiveHighLevel = 0x1 | 0x3<<2 // polarity 01, trigger mode 11
	lint1              = 1
	allProcessors      = 0xff
)

// madt lists one enabled Local APIC per vCPU (APIC ids 0..cpus-1, as KVM
// assigns them by vCPU index), the IOAPIC with GSI base 0, and overrides.
//
// ISA IRQs need no override for the timer: KVM's default GSI routing
// (kvm_setup_default_irq_routing) sends GSI n to IOAPIC pin n and the
// in-kernel PIT raises GSI 0, so IRQ0 is on pin 0, exactly what Linux
// assumes without an override. (QEMU's IRQ0->GSI2 override matches the
// routing QEMU itself installs, not KVM's default.) The one override is
// for the SCI, which ACPI defines as level-triggered: it states the
// polarity the VMM drives (active high) instead of the ACPI default (low).
func madt(cpus int, pic bool) []byte {
	b := make([]byte, 8, 8+8*cpus+12+10+6)
	binary.LittleEndian.PutUint32(b[0:], layout.LAPICAddr)
	if pic {
		binary.LittleEndian.PutUint32(b[4:], madtPCATCompat) // KVM's irqchip includes the 8259 pair
	}
	for i := range cpus {
		e := []byte{madtLocalAPIC, 8, uint8(i), uint8(i), 0, 0, 0, 0}
		binary.LittleEndian.PutUint32(e[4:], madtLAPICEnabled)
		b = append(b, e...)
	}
	io := []byte{madtIOAPIC, 12, ioapicID, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(io[4:], layout.IOAPICAddr)
	binary.LittleEndian.PutUint32(io[8:], 0) // GSI base
	b = append(b, io...)
	sci := []byte{madtIntOverride, 10, 0, layout.ACPISCIIRQ, 0, 0, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(sci[4:], layout.ACPISCIIRQ)
	binary.LittleEndian.PutUint16(sci[8:], mpsActiveHighLevel)
	b = append(b, sci...)
	// LINT1 of every local APIC is the NMI input, as on PC hardware.
	b = append(b, madtLocalAPICNMI, 6, allProcessors, 0, 0, lint1)
	return table("APIC", madtRevision, b)
}
