package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/layout"
)

// ELF constants (System V gABI, x86-64 psABI) and the PVH note
// (xen/include/public/elfnote.h, arch-x86/hvm/start_info.h).
const (
	elfMagic      = "\x7fELF"
	elfClass64    = 2
	elfData2LSB   = 1
	elfTypeExec   = 2
	elfMachineX86 = 62 // EM_X86_64
	elfHdrSize    = 64
	elfPhdrSize   = 56
	ptLoad        = 1
	ptNote        = 4

	xenNoteName       = "Xen"
	xenElfnotePhys32  = 18 // XEN_ELFNOTE_PHYS32_ENTRY
	hvmStartMagic     = 0x336ec578
	hvmStartVersion   = 1
	hvmStartInfoSize  = 56
	hvmModlistOff     = 0x40 // modlist entry right after start_info
	hvmModlistSize    = 32
	hvmMemmapEntSize  = 24
	hvmMemmapCapacity = (layout.ZeroPageAddr - layout.PVHMemmap) / hvmMemmapEntSize
)

// elfSegment is one PT_LOAD program header.
type elfSegment struct {
	Paddr, Offset, Filesz, Memsz uint64
}

// pvhKernel is a parsed ELF vmlinux with a PVH entry.
type pvhKernel struct {
	Entry    uint32 // XEN_ELFNOTE_PHYS32_ENTRY, a 32-bit physical address
	Segments []elfSegment
}

// parsePVH reads an ELF64 x86-64 executable's program headers and finds
// its PVH entry note. It only reads img, which may be anything.
func parsePVH(img []byte) (*pvhKernel, error) {
	if len(img) < elfHdrSize || string(img[:4]) != elfMagic {
		return nil, fmt.Errorf("not an ELF file (no ELF magic or shorter than an ELF header)")
	}
	if img[4] != elfClass64 {
		return nil, fmt.Errorf("ELF class %d is not ELF64; hpcvm boots 64-bit x86 kernels", img[4])
	}
	if img[5] != elfData2LSB {
		return nil, fmt.Errorf("ELF data encoding %d is not little-endian", img[5])
	}
	le := binary.LittleEndian
	if t := le.Uint16(img[16:]); t != elfTypeExec {
		return nil, fmt.Errorf("ELF type %d is not an executable (ET_EXEC)", t)
	}
	if m := le.Uint16(img[18:]); m != elfMachineX86 {
		return nil, fmt.Errorf("ELF machine %d is not x86-64", m)
	}
	phoff := le.Uint64(img[32:])
	phentsize := uint64(le.Uint16(img[54:]))
	phnum := uint64(le.Uint16(img[56:]))
	if phentsize < elfPhdrSize {
		return nil, fmt.Errorf("ELF program header size %d is smaller than %d", phentsize, elfPhdrSize)
	}
	if phnum == 0 {
		return nil, fmt.Errorf("ELF file has no program headers")
	}
	if phoff > uint64(len(img)) || phnum*phentsize > uint64(len(img))-phoff {
		return nil, fmt.Errorf("ELF program headers [%#x, +%d×%d) run past the file's end (%d bytes)", phoff, phnum, phentsize, len(img))
	}
	k := &pvhKernel{}
	found := false
	for i := range phnum {
		ph := img[phoff+i*phentsize:]
		off, filesz := le.Uint64(ph[8:]), le.Uint64(ph[32:])
		if off > uint64(len(img)) || filesz > uint64(len(img))-off {
			return nil, fmt.Errorf("ELF segment %d [%#x, +%#x) runs past the file's end (%d bytes)", i, off, filesz, len(img))
		}
		switch le.Uint32(ph) {
		case ptLoad:
			s := elfSegment{Paddr: le.Uint64(ph[24:]), Offset: off, Filesz: filesz, Memsz: le.Uint64(ph[40:])}
			if s.Filesz > s.Memsz {
				return nil, fmt.Errorf("ELF segment %d has p_filesz %#x > p_memsz %#x", i, s.Filesz, s.Memsz)
			}
			if s.Paddr+s.Memsz < s.Paddr {
				return nil, fmt.Errorf("ELF segment %d [%#x, +%#x) wraps around the address space", i, s.Paddr, s.Memsz)
			}
			if s.Memsz > 0 {
				k.Segments = append(k.Segments, s)
			}
		case ptNote:
			e, ok, err := findPVHNote(img[off : off+filesz])
			if err != nil {
				return nil, fmt.Errorf("ELF note segment %d: %w", i, err)
			}
			if ok {
				k.Entry, found = e, true
			}
		}
	}
	if !found {
		return nil, fmt.Errorf("ELF kernel has no PVH entry point (no %q note of type %d, XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y or boot its bzImage",
			xenNoteName, xenElfnotePhys32)
	}
	if len(k.Segments) == 0 {
		return nil, fmt.Errorf("ELF kernel has no loadable (PT_LOAD) segments")
	}
	return k, nil
}

// findPVHNote walks the notes of one PT_NOTE segment.
func findPVHNote(notes []byte) (entry uint32, found bool, err error) {
	le := binary.LittleEndian
	align4 := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for len(notes) > 0 {
		if len(notes) < 12 {
			return 0, false, fmt.Errorf("truncated note header (%d bytes left)", len(notes))
		}
		namesz, descsz, typ := uint64(le.Uint32(notes)), uint64(le.Uint32(notes[4:])), le.Uint32(notes[8:])
		n := uint64(len(notes))
		descOff := min(12+align4(namesz), n) // the last padding may be cut off
		if namesz > n-12 || descsz > n-descOff {
			return 0, false, fmt.Errorf("note (name %d bytes, desc %d bytes) runs past the segment's end", namesz, descsz)
		}
		name := notes[12 : 12+namesz]
		desc := notes[descOff : descOff+descsz]
		if typ == xenElfnotePhys32 && string(name) == xenNoteName+"\x00" {
			switch len(desc) {
			case 4:
				entry = le.Uint32(desc)
			case 8:
				v := le.Uint64(desc)
				if v > 0xffffffff {
					return 0, false, fmt.Errorf("PVH entry %#x is above 4 GiB", v)
				}
				entry = uint32(v)
			default:
				return 0, false, fmt.Errorf("PVH entry note has a %d-byte descriptor, want 4 or 8", len(desc))
			}
			found = true
		}
		next := min(descOff+align4(descsz), n)
		notes = notes[next:]
	}
	return entry, found, nil
}

func (l *loader) loadPVH() (*Entry, error) {
	k, err := parsePVH(l.kernel)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", l.kname, err)
	}
	kstart, kend := ^uint64(0), uint64(0)
	for i, s := range k.Segments {
		if s.Paddr < layout.HighMemStart || !l.inRAM(s.Paddr, s.Memsz) {
			return nil, fmt.Errorf("%s: ELF segment %d [%#x, %#x) is not in guest RAM above 1 MiB; give the guest more memory",
				l.kname, i, s.Paddr, s.Paddr+s.Memsz)
		}
		kstart, kend = min(kstart, s.Paddr), max(kend, s.Paddr+s.Memsz)
	}
	if uint64(k.Entry) < kstart || uint64(k.Entry) >= kend {
		return nil, fmt.Errorf("%s: PVH entry %#x is outside the loaded kernel [%#x, %#x)", l.kname, k.Entry, kstart, kend)
	}
	for _, s := range k.Segments {
		if err := l.write(s.Paddr, l.kernel[s.Offset:s.Offset+s.Filesz], l.kname); err != nil {
			return nil, err
		}
		if err := l.zero(s.Paddr+s.Filesz, s.Memsz-s.Filesz, l.kname+" (bss)"); err != nil {
			return nil, err
		}
	}
	if err := l.writeCmdline(layout.CmdlineMaxSize - 1); err != nil {
		return nil, fmt.Errorf("%s: %w", l.kname, err)
	}
	// The kernel may sit above the initrd's natural spot only if it was
	// linked high; the initrd goes below the MMIO gap, above the kernel.
	initrd, err := l.placeInitrd(layout.MMIOGapStart, max(kend, layout.HighMemStart))
	if err != nil {
		return nil, err
	}
	rsdp, err := l.writeACPI()
	if err != nil {
		return nil, err
	}
	si, mm, err := l.startInfo(initrd, rsdp)
	if err != nil {
		return nil, err
	}
	if err := l.write(layout.PVHStartInfo, si, "hvm_start_info"); err != nil {
		return nil, err
	}
	if err := l.write(layout.PVHMemmap, mm, "PVH memory map"); err != nil {
		return nil, err
	}
	if err := l.writeGDT(); err != nil {
		return nil, err
	}
	return &Entry{
		Protocol: PVH,
		IP:       uint64(k.Entry),
		BootInfo: layout.PVHStartInfo,
		RSDP:     rsdp,
		Kernel:   Region{kstart, kend - kstart},
		Initrd:   initrd,
	}, nil
}

// startInfo builds struct hvm_start_info (version 1) with its module list,
// and the hvm_memmap_table_entry array.
func (l *loader) startInfo(initrd Region, rsdp uint64) (si, mm []byte, err error) {
	le := binary.LittleEndian
	si = make([]byte, hvmModlistOff+hvmModlistSize)
	le.PutUint32(si[0:], hvmStartMagic)
	le.PutUint32(si[4:], hvmStartVersion)
	if initrd.Size > 0 {
		le.PutUint32(si[12:], 1)
		le.PutUint64(si[16:], layout.PVHStartInfo+hvmModlistOff)
		m := si[hvmModlistOff:]
		le.PutUint64(m[0:], initrd.Start)
		le.PutUint64(m[8:], initrd.Size)
	}
	le.PutUint64(si[24:], layout.CmdlineAddr)
	le.PutUint64(si[32:], rsdp)
	mmap := l.memoryMap()
	if len(mmap) > hvmMemmapCapacity {
		return nil, nil, fmt.Errorf("PVH memory map has %d entries, room for %d", len(mmap), hvmMemmapCapacity)
	}
	le.PutUint64(si[40:], layout.PVHMemmap)
	le.PutUint32(si[48:], uint32(len(mmap)))
	mm = make([]byte, hvmMemmapEntSize*len(mmap))
	for i, e := range mmap {
		o := mm[hvmMemmapEntSize*i:]
		le.PutUint64(o[0:], e.Addr)
		le.PutUint64(o[8:], e.Size)
		le.PutUint32(o[16:], e.Type)
	}
	return si, mm, nil
}
