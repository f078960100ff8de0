package boot

import (
	"encoding/binary"

	"github.com/bobuhiro11/gokvm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// Boot GDT selectors. 0x10/0x18 are __BOOT_CS/__BOOT_DS of the 64-bit boot
// protocol; the PVH entry uses the 32-bit code segment at 0x08.
const (
	selCode32 = 0x08
	selCode64 = 0x10
	selData   = 0x18
	selTSS    = 0x20
)

// Boot GDT: null, flat 32-bit code, flat 64-bit code, flat data, and a
// 16-byte system descriptor for a busy TSS (VM entry needs a usable TR).
func bootGDT() [6]uint64 {
	return [6]uint64{
		0,
		0x00cf9b000000ffff, // base 0, limit 4 GiB, G, D, P, code exec/read accessed
		0x00af9b000000ffff, // same with L (64-bit) instead of D
		0x00cf93000000ffff, // base 0, limit 4 GiB, G, B, P, data read/write accessed
		0x00008b0000000067, // TSS: base 0, limit 0x67, P, type 11 (busy)
		0,                  // upper half of the 64-bit TSS descriptor
	}
}

const gdtLimit = 6*8 - 1

// Control register bits.
const (
	cr0PE   = 1 << 0
	cr0ET   = 1 << 4
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10

	pteP  = 1 << 0
	pteRW = 1 << 1
	ptePS = 1 << 7 // 2 MiB page in a page directory entry
)

// pdPages is the number of page directories identity-mapping 0..4 GiB.
const pdPages = 4

func (l *loader) writeGDT() error {
	gdt := bootGDT()
	b := make([]byte, 8*len(gdt))
	for i, d := range gdt {
		binary.LittleEndian.PutUint64(b[8*i:], d)
	}
	return l.write(layout.GDTAddr, b, "boot GDT")
}

// writePageTables identity-maps [0, 4 GiB) with 2 MiB pages: one PML4
// entry, four PDPT entries, four page directories. Linux builds its own
// tables early; these only have to cover the kernel, zero page, command
// line and initrd, which all lie below 4 GiB.
func (l *loader) writePageTables() error {
	le := binary.LittleEndian
	pml4 := make([]byte, 4096)
	le.PutUint64(pml4, layout.PDPTAddr|pteP|pteRW)
	pdpt := make([]byte, 4096)
	pd := make([]byte, 4096*pdPages)
	for i := range pdPages {
		le.PutUint64(pdpt[8*i:], uint64(layout.PDAddr+4096*i)|pteP|pteRW)
	}
	for i := range 512 * pdPages {
		le.PutUint64(pd[8*i:], uint64(i)<<21|pteP|pteRW|ptePS)
	}
	if err := l.write(layout.PML4Addr, pml4, "PML4"); err != nil {
		return err
	}
	if err := l.write(layout.PDPTAddr, pdpt, "PDPT"); err != nil {
		return err
	}
	return l.write(layout.PDAddr, pd, "page directories")
}

// flat returns a present, flat 4 GiB segment with the given selector/type.
func flat(sel uint16, typ uint8, code64 bool) kvm.Segment {
	s := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: sel, Typ: typ, Present: 1, S: 1, G: 1, DB: 1}
	if code64 {
		s.L, s.DB = 1, 0
	}
	return s
}

// SetupRegisters sets the boot vCPU's registers, as read with
// KVM_GET_REGS/KVM_GET_SREGS, for entering the kernel; the caller then
// writes them back with KVM_SET_REGS/KVM_SET_SREGS. Interrupts are off
// (RFLAGS = 2); the IDT is empty, as both protocols require the kernel to
// install its own before enabling them.
func (e *Entry) SetupRegisters(regs *kvm.Regs, sregs *kvm.Sregs) {
	regs.RFLAGS = 2
	regs.RIP = e.IP
	regs.RSP = layout.BootStackTop
	regs.RBP = 0
	regs.RSI, regs.RBX = 0, 0

	sregs.GDT = kvm.Descriptor{Base: layout.GDTAddr, Limit: uint16(gdtLimit)}
	sregs.IDT = kvm.Descriptor{}
	data := flat(selData, 3, false)
	sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = data, data, data, data, data
	sregs.TR = kvm.Segment{Selector: selTSS, Limit: 0x67, Typ: 11, Present: 1}

	switch e.Protocol {
	case BzImage64:
		regs.RSI = e.BootInfo
		sregs.CS = flat(selCode64, 11, true)
		sregs.CR0 = cr0PE | cr0ET | cr0PG
		sregs.CR3 = layout.PML4Addr
		sregs.CR4 = cr4PAE
		sregs.EFER = eferLME | eferLMA
	case PVH:
		regs.RBX = e.BootInfo
		sregs.CS = flat(selCode32, 11, false)
		sregs.CR0 = cr0PE | cr0ET
		sregs.CR3 = 0
		sregs.CR4 = 0
		sregs.EFER = 0
	}
}
