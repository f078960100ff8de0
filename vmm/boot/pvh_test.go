package boot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/boot/internal/testmem"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// elfSeg is a segment of a synthetic ELF: PT_LOAD (data at paddr, memsz
// may exceed len(data)) or PT_NOTE.
type elfSeg struct {
	typ   uint32
	paddr uint64
	data  []byte
	memsz uint64
}

// note encodes one ELF note.
func note(name string, typ uint32, desc []byte) []byte {
	le := binary.LittleEndian
	pad := func(b []byte) []byte { return append(b, make([]byte, (4-len(b)%4)%4)...) }
	b := make([]byte, 12)
	le.PutUint32(b, uint32(len(name)+1))
	le.PutUint32(b[4:], uint32(len(desc)))
	le.PutUint32(b[8:], typ)
	b = append(b, pad(append([]byte(name), 0))...)
	return append(b, pad(bytes.Clone(desc))...)
}

func pvhNote(entry uint32) []byte {
	return note("Xen", xenElfnotePhys32, binary.LittleEndian.AppendUint32(nil, entry))
}

// makeELF writes an ELF64 x86-64 executable with the given segments.
func makeELF(segs []elfSeg) []byte {
	le := binary.LittleEndian
	hdr := make([]byte, elfHdrSize)
	copy(hdr, elfMagic)
	hdr[4], hdr[5], hdr[6] = elfClass64, elfData2LSB, 1
	le.PutUint16(hdr[16:], elfTypeExec)
	le.PutUint16(hdr[18:], elfMachineX86)
	le.PutUint32(hdr[20:], 1)
	le.PutUint64(hdr[24:], 0xffffffff81000000) // e_entry: the virtual startup_64, unused by PVH
	le.PutUint64(hdr[32:], elfHdrSize)
	le.PutUint16(hdr[52:], elfHdrSize)
	le.PutUint16(hdr[54:], elfPhdrSize)
	le.PutUint16(hdr[56:], uint16(len(segs)))
	le.PutUint16(hdr[58:], 64) // e_shentsize, no sections
	off := uint64(elfHdrSize + elfPhdrSize*len(segs))
	var phdrs, data []byte
	for _, s := range segs {
		ph := make([]byte, elfPhdrSize)
		le.PutUint32(ph, s.typ)
		le.PutUint32(ph[4:], 5)
		le.PutUint64(ph[8:], off+uint64(len(data)))
		le.PutUint64(ph[16:], s.paddr+0xffffffff80000000)
		le.PutUint64(ph[24:], s.paddr)
		le.PutUint64(ph[32:], uint64(len(s.data)))
		le.PutUint64(ph[40:], max(s.memsz, uint64(len(s.data))))
		le.PutUint64(ph[48:], 4)
		phdrs = append(phdrs, ph...)
		data = append(data, s.data...)
	}
	return append(append(hdr, phdrs...), data...)
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i) ^ seed
	}
	return b
}

func testPVHKernel() []byte {
	return makeELF([]elfSeg{
		{typ: ptLoad, paddr: 0x1000000, data: pattern(5000, 1)},
		{typ: ptNote, data: append(note("Linux", 1, []byte("6.1")), pvhNote(0x1000100)...)},
		{typ: ptLoad, paddr: 0x1002000, data: pattern(300, 2), memsz: 0x3000}, // data + bss
	})
}

func TestSyntheticELFIsValid(t *testing.T) {
	f, err := elf.NewFile(bytes.NewReader(testPVHKernel()))
	if err != nil {
		t.Fatalf("debug/elf rejects the test's ELF: %v", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || len(f.Progs) != 3 || f.Progs[2].Memsz != 0x3000 {
		t.Errorf("debug/elf reads %v %v with %d program headers", f.Class, f.Machine, len(f.Progs))
	}
}

func TestLoadPVH(t *testing.T) {
	img := testPVHKernel()
	mem := testmem.New(testRAM)
	// Dirty the BSS so the test sees it being cleared.
	copy(mem.Bytes(0x1002000, 0x3000), bytes.Repeat([]byte{0xaa}, 0x3000))
	initrd := pattern(10000, 9)
	cmdline := "console=hvc0 quiet"
	e, err := Load(mem, Config{Kernel: img, Initrd: initrd, Cmdline: cmdline, RAM: RAMRegions(testRAM), CPUs: 3})
	if err != nil {
		t.Fatal(err)
	}
	if e.Protocol != PVH || e.IP != 0x1000100 || e.BootInfo != layout.PVHStartInfo || e.RSDP != layout.ACPITablesAddr {
		t.Errorf("entry %+v", e)
	}
	if !bytes.Equal(mem.Bytes(0x1000000, 5000), pattern(5000, 1)) || !bytes.Equal(mem.Bytes(0x1002000, 300), pattern(300, 2)) {
		t.Error("PT_LOAD segments not at their physical addresses")
	}
	if !bytes.Equal(mem.Bytes(0x1002000+300, 0x3000-300), make([]byte, 0x3000-300)) {
		t.Error("BSS (p_memsz beyond p_filesz) not zeroed")
	}
	if e.Kernel != (Region{0x1000000, 0x5000}) {
		t.Errorf("kernel region %+v", e.Kernel)
	}
	if e.Initrd.Start%4096 != 0 || e.Initrd.End() > testRAM || e.Initrd.Start < e.Kernel.End() ||
		!bytes.Equal(mem.Bytes(e.Initrd.Start, len(initrd)), initrd) {
		t.Errorf("initrd at %+v", e.Initrd)
	}
	if got := mem.Bytes(layout.CmdlineAddr, len(cmdline)+1); string(got) != cmdline+"\x00" {
		t.Errorf("command line %q", got)
	}

	le := binary.LittleEndian
	si := mem.Bytes(layout.PVHStartInfo, hvmStartInfoSize)
	ml := mem.Bytes(le.Uint64(si[16:]), hvmModlistSize)
	for _, f := range []struct {
		name      string
		got, want uint64
	}{
		{"magic", uint64(le.Uint32(si[0:])), 0x336ec578},
		{"version", uint64(le.Uint32(si[4:])), 1},
		{"flags", uint64(le.Uint32(si[8:])), 0},
		{"nr_modules", uint64(le.Uint32(si[12:])), 1},
		{"cmdline_paddr", le.Uint64(si[24:]), layout.CmdlineAddr},
		{"rsdp_paddr", le.Uint64(si[32:]), layout.ACPITablesAddr},
		{"memmap_paddr", le.Uint64(si[40:]), layout.PVHMemmap},
		{"memmap_entries", uint64(le.Uint32(si[48:])), 3},
		{"module paddr", le.Uint64(ml[0:]), e.Initrd.Start},
		{"module size", le.Uint64(ml[8:]), uint64(len(initrd))},
		{"module cmdline_paddr", le.Uint64(ml[16:]), 0},
	} {
		if f.got != f.want {
			t.Errorf("start_info %s = %#x, want %#x", f.name, f.got, f.want)
		}
	}
	mm := mem.Bytes(layout.PVHMemmap, 3*hvmMemmapEntSize)
	for i, w := range []e820Entry{
		{0, layout.EBDAStart, e820RAM},
		{layout.EBDAStart, layout.HighMemStart - layout.EBDAStart, e820Reserved},
		{layout.HighMemStart, testRAM - layout.HighMemStart, e820RAM},
	} {
		o := mm[hvmMemmapEntSize*i:]
		if g := (e820Entry{le.Uint64(o), le.Uint64(o[8:]), le.Uint32(o[16:])}); g != w || le.Uint32(o[20:]) != 0 {
			t.Errorf("memmap[%d] = %+v, want %+v", i, g, w)
		}
	}
	checkRegisters(t, mem, e)
}

func TestLoadPVHNoInitrd(t *testing.T) {
	mem := testmem.New(testRAM)
	e, err := Load(mem, Config{Kernel: testPVHKernel(), RAM: RAMRegions(testRAM), CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	si := mem.Bytes(layout.PVHStartInfo, hvmStartInfoSize)
	if n, p := binary.LittleEndian.Uint32(si[12:]), binary.LittleEndian.Uint64(si[16:]); n != 0 || p != 0 || e.Initrd.Size != 0 {
		t.Errorf("no initrd, but nr_modules %d modlist_paddr %#x initrd %+v", n, p, e.Initrd)
	}
}

func TestLoadPVHErrors(t *testing.T) {
	good := testPVHKernel()
	set := func(off int, v ...byte) []byte { b := bytes.Clone(good); copy(b[off:], v); return b }
	load := elfSeg{typ: ptLoad, paddr: 0x1000000, data: pattern(100, 0)}
	for _, tc := range []struct {
		name   string
		kernel []byte
		want   string
	}{
		{"ELF magic only", []byte(elfMagic), "shorter than an ELF header"},
		{"ELF32", set(4, 1), "not ELF64"},
		{"big-endian", set(5, 2), "not little-endian"},
		{"shared object", set(16, 3), "not an executable"},
		{"aarch64", set(18, 183), "not x86-64"},
		{"no program headers", set(56, 0, 0), "no program headers"},
		{"phdrs past end", good[:elfHdrSize+elfPhdrSize], "run past the file's end"},
		{"segment past end", good[:len(good)-10], "runs past the file's end"},
		{"no PVH note", makeELF([]elfSeg{load, {typ: ptNote, data: note("Linux", 1, []byte("6.1"))}}), "no PVH entry point"},
		{"PVH note wrong owner", makeELF([]elfSeg{load, {typ: ptNote, data: note("Xe", xenElfnotePhys32, []byte{0, 1, 0, 0})}}), "no PVH entry point"},
		{"truncated note", makeELF([]elfSeg{load, {typ: ptNote, data: pvhNote(0x1000000)[:14]}}), "runs past the segment's end"},
		{"odd note descriptor", makeELF([]elfSeg{load, {typ: ptNote, data: note("Xen", xenElfnotePhys32, []byte{1, 2})}}), "2-byte descriptor"},
		{"no PT_LOAD", makeELF([]elfSeg{{typ: ptNote, data: pvhNote(0x1000000)}}), "no loadable"},
		{"entry outside kernel", makeELF([]elfSeg{load, {typ: ptNote, data: pvhNote(0x2000000)}}), "outside the loaded kernel"},
		{"segment below 1 MiB", makeELF([]elfSeg{{typ: ptLoad, paddr: 0x7000, data: []byte{1}}, {typ: ptNote, data: pvhNote(0x7000)}}),
			"not in guest RAM above 1 MiB"},
		{"segment beyond RAM", makeELF([]elfSeg{{typ: ptLoad, paddr: 0x1000000, data: []byte{1}, memsz: testRAM}, {typ: ptNote, data: pvhNote(0x1000000)}}),
			"give the guest more memory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(testmem.New(testRAM), Config{Kernel: tc.kernel, RAM: RAMRegions(testRAM), CPUs: 1})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestFindPVHNote64BitDescriptor(t *testing.T) {
	notes := note("Xen", xenElfnotePhys32, binary.LittleEndian.AppendUint64(nil, 0x1000000))
	e, ok, err := findPVHNote(notes)
	if err != nil || !ok || e != 0x1000000 {
		t.Errorf("findPVHNote = %#x, %v, %v; want 0x1000000", e, ok, err)
	}
}

// TestRealPVH loads a real vmlinux with a PVH note when HPCVM_TEST_VMLINUX
// names one (e.g. the node kernel the e2e tests build).
func TestRealPVH(t *testing.T) {
	path := os.Getenv("HPCVM_TEST_VMLINUX")
	if path == "" {
		t.Skip("no real vmlinux: set HPCVM_TEST_VMLINUX to an ELF kernel built with CONFIG_PVH=y")
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	k, err := parsePVH(img)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	t.Logf("%s: PVH entry %#x, %d PT_LOAD segments", path, k.Entry, len(k.Segments))
	const ram = 256 << 20
	mem := testmem.New(ram)
	e, err := Load(mem, Config{Kernel: img, Initrd: []byte("cpio"), Cmdline: "console=ttyS0", RAM: RAMRegions(ram), CPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	if e.Kernel.End() > e.Initrd.Start {
		t.Errorf("initrd %+v overlaps kernel %+v", e.Initrd, e.Kernel)
	}
	checkRegisters(t, mem, e)
}
