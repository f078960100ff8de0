package microguest

import (
	"encoding/binary"
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Micro-guest memory map (independent of the Linux layout).
const (
	PML4Addr  = 0x1000
	PDPTAddr  = 0x2000
	PDAddr    = 0x3000 // 4 pages: 2 MiB pages over 0..4 GiB
	GDTAddr   = 0x7000
	TSSAddr   = 0x7800
	CodeAddr  = 0x10000 // code is loaded here
	StackTop  = 0x80000 // vCPU i's stack top is StackTop - i*StackSize
	StackSize = 0x1000
	DataAddr  = 0x100000 // first byte free for test data
	MinMemory = 2 << 20
)

// Segment selectors in the micro-guest GDT (RPL 3).
const (
	selCode = 3<<3 | 3
	selData = 4<<3 | 3
	selTSS  = 5 << 3
)

// Program is a micro-guest: code placed at CodeAddr, started on every vCPU
// at CPL3 in 64-bit mode with RDI = vCPU index and RSI = number of vCPUs.
type Program struct {
	Code []byte
}

// Load writes the page tables, GDT and code into guest memory.
// Every 2 MiB page of 0..4 GiB is identity-mapped, present, writable and
// user-accessible, so guest addresses equal guest-physical addresses and an
// access to a hole in RAM becomes an MMIO exit.
func (p Program) Load(mem *memory.RAM, ncpu int) error { return p.LoadInto(mem) }

// LoadInto is Load for any guest memory implementation.
func (p Program) LoadInto(mem memory.Guest) error {
	if mem.Size() < MinMemory {
		return fmt.Errorf("micro-guest needs at least %d bytes of RAM, have %d", MinMemory, mem.Size())
	}
	if CodeAddr+len(p.Code) > StackTop-64*StackSize {
		return fmt.Errorf("micro-guest code of %d bytes does not fit below the stacks", len(p.Code))
	}
	const (
		present = 1 << 0
		write   = 1 << 1
		user    = 1 << 2
		huge    = 1 << 7
	)
	page := make([]byte, memory.PageSize)
	binary.LittleEndian.PutUint64(page, PDPTAddr|present|write|user)
	if _, err := mem.WriteAt(page, PML4Addr); err != nil {
		return err
	}
	clear(page)
	for i := 0; i < 4; i++ {
		binary.LittleEndian.PutUint64(page[8*i:], uint64(PDAddr+i*memory.PageSize)|present|write|user)
	}
	if _, err := mem.WriteAt(page, PDPTAddr); err != nil {
		return err
	}
	pd := make([]byte, 4*memory.PageSize)
	for i := 0; i < 2048; i++ {
		binary.LittleEndian.PutUint64(pd[8*i:], uint64(i)<<21|present|write|user|huge)
	}
	if _, err := mem.WriteAt(pd, PDAddr); err != nil {
		return err
	}
	// GDT: null, (unused), (unused), user code 64, user data, TSS (16 bytes).
	gdt := make([]byte, 7*8)
	binary.LittleEndian.PutUint64(gdt[3*8:], 0x00AFFA000000FFFF) // L=1, DPL3, code exec/read
	binary.LittleEndian.PutUint64(gdt[4*8:], 0x00CFF2000000FFFF) // DPL3, data read/write
	binary.LittleEndian.PutUint64(gdt[5*8:], 0x00008B0000000067|uint64(TSSAddr&0xFFFFFF)<<16)
	if _, err := mem.WriteAt(gdt, GDTAddr); err != nil {
		return err
	}
	_, err := mem.WriteAt(p.Code, CodeAddr)
	return err
}

// SetupVCPU sets registers so vCPU id starts the program at CPL3.
func (p Program) SetupVCPU(id, ncpu int, regs *kvm.Regs, sregs *kvm.Sregs) bool {
	code := kvm.Segment{Base: 0, Limit: 0xFFFFFFFF, Selector: selCode, Typ: 0xB, Present: 1, DPL: 3, S: 1, L: 1, G: 1}
	data := kvm.Segment{Base: 0, Limit: 0xFFFFFFFF, Selector: selData, Typ: 0x3, Present: 1, DPL: 3, DB: 1, S: 1, G: 1}
	sregs.CS = code
	sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = data, data, data, data, data
	sregs.TR = kvm.Segment{Base: TSSAddr, Limit: 0x67, Selector: selTSS, Typ: 0xB, Present: 1}
	sregs.LDT = kvm.Segment{Unusable: 1}
	sregs.GDT = kvm.Descriptor{Base: GDTAddr, Limit: 7*8 - 1}
	sregs.IDT = kvm.Descriptor{Base: 0, Limit: 0}
	sregs.CR3 = PML4Addr
	sregs.CR4 = 1<<5 | 1<<9 | 1<<10                       // PAE, OSFXSR, OSXMMEXCPT
	sregs.CR0 = 1<<0 | 1<<1 | 1<<4 | 1<<5 | 1<<16 | 1<<31 // PE MP ET NE WP PG
	sregs.EFER = 1<<8 | 1<<10                             // LME LMA
	*regs = kvm.Regs{
		RIP:    CodeAddr,
		RSP:    uint64(StackTop - id*StackSize),
		RDI:    uint64(id),
		RSI:    uint64(ncpu),
		RFLAGS: 0x2 | 3<<12, // IOPL 3: port I/O at CPL3 exits to the VMM
	}
	return true
}
