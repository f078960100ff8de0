package boot

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bobuhiro11/gokvm/kvm"
	"github.com/hpcvm/hpcvm/vmm/boot/internal/testmem"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

const testRAM = 32 << 20

// bzOpts are the setup-header fields of a synthetic bzImage.
type bzOpts struct {
	version     uint16
	setupSects  uint8
	loadFlags   uint8
	xloadFlags  uint16
	kernelSize  int
	prefAddress uint64
	initSize    uint32
	cmdlineSize uint32
	initrdMax   uint32
}

func defaultBzOpts() bzOpts {
	return bzOpts{
		version: 0x020f, setupSects: 2, loadFlags: loadedHigh, xloadFlags: xlfKernel64 | 2,
		kernelSize: 8192, prefAddress: 0x1000000, initSize: 0x400000, cmdlineSize: 0x7ff, initrdMax: 0x7fffffff,
	}
}

// makeBzImage builds a bzImage whose protected-mode part is a recognisable
// byte pattern.
func makeBzImage(o bzOpts) []byte {
	le := binary.LittleEndian
	sects := int(o.setupSects)
	if sects == 0 {
		sects = defaultSects
	}
	setup := (sects + 1) * 512
	img := make([]byte, setup+o.kernelSize)
	img[hdrStart] = o.setupSects
	le.PutUint16(img[hdrBootFlag:], bzBootFlag)
	img[hdrJump] = 0xeb
	img[hdrJump+1] = hdrEndV212 + 4 - hdrMagicOff // header ends after kernel_info_offset
	copy(img[hdrMagicOff:], bzMagic)
	le.PutUint16(img[hdrVersion:], o.version)
	img[hdrLoadFlags] = o.loadFlags
	le.PutUint32(img[hdrInitrdAddrMax:], o.initrdMax)
	le.PutUint32(img[hdrKernelAlign:], 0x200000)
	img[hdrRelocatable] = 1
	le.PutUint16(img[hdrXLoadFlags:], o.xloadFlags)
	le.PutUint32(img[hdrCmdlineSize:], o.cmdlineSize)
	le.PutUint64(img[hdrPrefAddress:], o.prefAddress)
	le.PutUint32(img[hdrInitSize:], o.initSize)
	for i := setup; i < len(img); i++ {
		img[i] = byte(i*7 + 3)
	}
	return img
}

func TestLoadBzImage(t *testing.T) {
	img := makeBzImage(defaultBzOpts())
	initrd := bytes.Repeat([]byte("initrd!"), 3000)
	mem := testmem.New(testRAM)
	cmdline := "console=ttyS0 root=/dev/vda"
	e, err := Load(mem, Config{Kernel: img, Initrd: initrd, Cmdline: cmdline, RAM: RAMRegions(testRAM), CPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	setup := 3 * 512

	if e.Protocol != BzImage64 || e.IP != layout.HighMemStart+0x200 || e.BootInfo != layout.ZeroPageAddr {
		t.Errorf("entry = %+v, want bzImage at %#x with boot_params at %#x", e, layout.HighMemStart+0x200, layout.ZeroPageAddr)
	}
	if got := mem.Bytes(layout.HighMemStart, len(img)-setup); !bytes.Equal(got, img[setup:]) {
		t.Error("protected-mode kernel not copied to 1 MiB")
	}
	// Relocatable: runs at pref_address (16 MiB) for init_size bytes.
	if want := (Region{layout.HighMemStart, 0x1400000 - layout.HighMemStart}); e.Kernel != want {
		t.Errorf("kernel footprint %+v, want %+v", e.Kernel, want)
	}
	if e.Initrd.Size != uint64(len(initrd)) || e.Initrd.Start%4096 != 0 ||
		e.Initrd.Start < e.Kernel.End() || e.Initrd.End() > testRAM || testRAM-e.Initrd.Start > uint64(len(initrd))+4096 {
		t.Errorf("initrd at %+v: want page-aligned at the top of %#x bytes of RAM, above the kernel", e.Initrd, testRAM)
	}
	if !bytes.Equal(mem.Bytes(e.Initrd.Start, len(initrd)), initrd) {
		t.Error("initrd contents not at the reported address")
	}
	if got := mem.Bytes(layout.CmdlineAddr, len(cmdline)+1); string(got) != cmdline+"\x00" {
		t.Errorf("command line %q", got)
	}

	zp := mem.Bytes(layout.ZeroPageAddr, bpSize)
	hdrEnd := hdrEndV212 + 4
	for _, f := range []struct {
		name      string
		got, want uint64
	}{
		{"type_of_loader", uint64(zp[hdrTypeOfLoader]), 0xff},
		{"cmd_line_ptr", uint64(le.Uint32(zp[hdrCmdLinePtr:])), layout.CmdlineAddr},
		{"ramdisk_image", uint64(le.Uint32(zp[hdrRamdiskImage:])), e.Initrd.Start},
		{"ramdisk_size", uint64(le.Uint32(zp[hdrRamdiskSize:])), uint64(len(initrd))},
		{"code32_start", uint64(le.Uint32(zp[hdrCode32Start:])), layout.HighMemStart},
		{"acpi_rsdp_addr", le.Uint64(zp[bpACPIRSDPAddr:]), layout.ACPITablesAddr},
		{"loadflags", uint64(zp[hdrLoadFlags]), loadedHigh},
		{"version", uint64(le.Uint16(zp[hdrVersion:])), 0x020f},
		{"boot_flag", uint64(le.Uint16(zp[hdrBootFlag:])), bzBootFlag},
		{"e820_entries", uint64(zp[bpE820Entries]), 3},
		{"byte after header", uint64(zp[hdrEnd]), 0},
	} {
		if f.got != f.want {
			t.Errorf("zero page %s = %#x, want %#x", f.name, f.got, f.want)
		}
	}
	if string(zp[hdrMagicOff:hdrMagicOff+4]) != bzMagic {
		t.Error("setup header not copied into the zero page")
	}
	wantE820 := []e820Entry{
		{0, layout.EBDAStart, e820RAM},
		{layout.EBDAStart, layout.HighMemStart - layout.EBDAStart, e820Reserved},
		{layout.HighMemStart, testRAM - layout.HighMemStart, e820RAM},
	}
	for i, w := range wantE820 {
		o := zp[bpE820Table+20*i:]
		if g := (e820Entry{le.Uint64(o), le.Uint64(o[8:]), le.Uint32(o[16:])}); g != w {
			t.Errorf("e820[%d] = %+v, want %+v", i, g, w)
		}
	}
	if !bytes.Equal(mem.Bytes(layout.ACPITablesAddr, 8), []byte("RSD PTR ")) {
		t.Error("no RSDP at the ACPI tables address")
	}
	checkPageTables(t, mem)
	checkRegisters(t, mem, e)
}

// checkPageTables walks the identity map for addresses across 0..4 GiB.
func checkPageTables(t *testing.T, mem *testmem.Mem) {
	t.Helper()
	le := binary.LittleEndian
	for _, va := range []uint64{0, 0x1234, layout.HighMemStart + 0x200, 0x40000000, layout.MMIOGapStart, layout.IOAPICAddr, 1<<32 - 1} {
		e := le.Uint64(mem.Bytes(layout.PML4Addr+8*(va>>39&511), 8))
		if e&pteP == 0 {
			t.Fatalf("va %#x: PML4 entry not present", va)
		}
		e = le.Uint64(mem.Bytes(e&^0xfff+8*(va>>30&511), 8))
		if e&pteP == 0 || e&ptePS != 0 {
			t.Fatalf("va %#x: PDPT entry %#x not a present table pointer", va, e)
		}
		e = le.Uint64(mem.Bytes(e&^0xfff+8*(va>>21&511), 8))
		if e&(pteP|pteRW|ptePS) != pteP|pteRW|ptePS {
			t.Fatalf("va %#x: PD entry %#x not a present writable 2 MiB page", va, e)
		}
		if pa := e&^(1<<21-1)&(1<<52-1) | va&(1<<21-1); pa != va {
			t.Errorf("va %#x maps to %#x", va, pa)
		}
	}
}

// decodeSegment turns the GDT descriptor for sel into the KVM view.
func decodeSegment(t *testing.T, mem *testmem.Mem, sel uint16) kvm.Segment {
	t.Helper()
	d := binary.LittleEndian.Uint64(mem.Bytes(layout.GDTAddr+uint64(sel), 8))
	limit := uint32(d&0xffff | d>>32&0xf0000)
	g := uint8(d >> 55 & 1)
	if g == 1 {
		limit = limit<<12 | 0xfff
	}
	return kvm.Segment{
		Base: d>>16&0xffffff | d>>32&0xff000000, Limit: limit, Selector: sel,
		Typ: uint8(d >> 40 & 0xf), S: uint8(d >> 44 & 1), DPL: uint8(d >> 45 & 3), Present: uint8(d >> 47 & 1),
		AVL: uint8(d >> 52 & 1), L: uint8(d >> 53 & 1), DB: uint8(d >> 54 & 1), G: g,
	}
}

// checkRegisters checks SetupRegisters against the protocol and that the
// hidden segment state matches the GDT in guest memory.
func checkRegisters(t *testing.T, mem *testmem.Mem, e *Entry) {
	t.Helper()
	regs := kvm.Regs{RAX: 1, RDX: 0x600}
	sregs := kvm.Sregs{CR0: 0x60000010, ApicBase: 0xfee00900}
	e.SetupRegisters(&regs, &sregs)
	if regs.RIP != e.IP || regs.RFLAGS != 2 {
		t.Errorf("RIP %#x RFLAGS %#x, want %#x and 2", regs.RIP, regs.RFLAGS, e.IP)
	}
	if sregs.ApicBase != 0xfee00900 {
		t.Error("SetupRegisters changed the APIC base")
	}
	if sregs.GDT.Base != layout.GDTAddr || sregs.GDT.Limit != gdtLimit {
		t.Errorf("GDT %+v", sregs.GDT)
	}
	for name, s := range map[string]kvm.Segment{"CS": sregs.CS, "DS": sregs.DS, "ES": sregs.ES, "SS": sregs.SS} {
		if g := decodeSegment(t, mem, s.Selector); g != s {
			t.Errorf("%s = %+v, but its GDT descriptor says %+v", name, s, g)
		}
	}
	tr := decodeSegment(t, mem, sregs.TR.Selector)
	if tr != sregs.TR || tr.Typ != 11 || tr.S != 0 {
		t.Errorf("TR = %+v, GDT says %+v; want a busy TSS", sregs.TR, tr)
	}
	switch e.Protocol {
	case BzImage64:
		if regs.RSI != layout.ZeroPageAddr || sregs.CR3 != layout.PML4Addr || sregs.CR0&(cr0PE|cr0PG) != cr0PE|cr0PG ||
			sregs.CR4&cr4PAE == 0 || sregs.EFER&(eferLME|eferLMA) != eferLME|eferLMA || sregs.CS.L != 1 || sregs.CS.Selector != 0x10 || sregs.DS.Selector != 0x18 {
			t.Errorf("long-mode entry state wrong: RSI %#x CR0 %#x CR3 %#x CR4 %#x EFER %#x CS %+v", regs.RSI, sregs.CR0, sregs.CR3, sregs.CR4, sregs.EFER, sregs.CS)
		}
	case PVH:
		if regs.RBX != layout.PVHStartInfo || sregs.CR0&cr0PG != 0 || sregs.CR0&cr0PE == 0 || sregs.EFER != 0 ||
			sregs.CS.L != 0 || sregs.CS.DB != 1 || sregs.CS.Limit != 0xffffffff {
			t.Errorf("PVH entry state wrong: RBX %#x CR0 %#x EFER %#x CS %+v", regs.RBX, sregs.CR0, sregs.EFER, sregs.CS)
		}
	}
}

func TestLoadBzImageErrors(t *testing.T) {
	mod := func(f func(*bzOpts)) []byte {
		o := defaultBzOpts()
		f(&o)
		return makeBzImage(o)
	}
	good := makeBzImage(defaultBzOpts())
	for _, tc := range []struct {
		name    string
		kernel  []byte
		initrd  []byte
		cmdline string
		ram     uint64
		want    string
	}{
		{name: "empty", kernel: []byte{}, want: `not a bzImage (no "HdrS" magic at 0x202) nor an ELF file`},
		{name: "garbage", kernel: bytes.Repeat([]byte{0x90}, 4096), want: "nor an ELF file"},
		{name: "truncated header", kernel: good[:0x220], want: "truncated"},
		{name: "truncated setup", kernel: good[:3*512], want: "setup sectors end at"},
		{name: "bad boot flag", kernel: func() []byte { b := bytes.Clone(good); b[hdrBootFlag] = 0; return b }(), want: "boot_flag"},
		{name: "old protocol", kernel: mod(func(o *bzOpts) { o.version = 0x0204 }), want: "2.04 is too old"},
		{name: "zImage", kernel: mod(func(o *bzOpts) { o.loadFlags = 0 }), want: "LOADED_HIGH"},
		{name: "32-bit only", kernel: mod(func(o *bzOpts) { o.xloadFlags = 0 }), want: "XLF_KERNEL_64"},
		{name: "kernel too big", kernel: mod(func(o *bzOpts) { o.initSize = testRAM }), want: "kernel needs RAM"},
		{name: "cmdline too long", kernel: mod(func(o *bzOpts) { o.cmdlineSize = 8 }), cmdline: "console=ttyS0", want: "at most 8"},
		{name: "initrd too big", kernel: good, initrd: make([]byte, 20<<20), want: "does not fit"},
		{name: "initrd limit", kernel: mod(func(o *bzOpts) { o.initrdMax = 0x17fffff }), initrd: make([]byte, 8<<20), want: "does not fit"},
		{name: "RAM below 1 MiB", kernel: good, ram: 1 << 20, want: "below the kernel load address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ram := orDefault(tc.ram, testRAM)
			_, err := Load(testmem.New(ram), Config{Kernel: tc.kernel, Initrd: tc.initrd, Cmdline: tc.cmdline, RAM: RAMRegions(ram), CPUs: 1})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// orDefault returns v, or def if v is zero.
func orDefault(v, def uint64) uint64 {
	if v == 0 {
		return def
	}
	return v
}

func TestLoadInputErrors(t *testing.T) {
	mem := testmem.New(testRAM)
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no kernel", Config{RAM: RAMRegions(testRAM), CPUs: 1}, "no kernel given"},
		{"missing file", Config{KernelPath: "/nonexistent/vmlinuz", RAM: RAMRegions(testRAM), CPUs: 1}, "/nonexistent/vmlinuz"},
		{"no RAM", Config{Kernel: []byte("x"), CPUs: 1}, "no guest RAM"},
		{"RAM size mismatch", Config{Kernel: []byte("x"), RAM: RAMRegions(testRAM * 2), CPUs: 1}, "guest memory has"},
		{"RAM in gap", Config{Kernel: []byte("x"), RAM: []Region{{0, testRAM / 2}, {layout.MMIOGapStart, testRAM / 2}}, CPUs: 1}, "MMIO gap"},
		{"no CPUs", Config{Kernel: makeBzImage(defaultBzOpts()), RAM: RAMRegions(testRAM)}, "vCPUs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(mem, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestLoadFromPath(t *testing.T) {
	dir := t.TempDir()
	kp, ip := filepath.Join(dir, "bzImage"), filepath.Join(dir, "initrd")
	if err := os.WriteFile(kp, makeBzImage(defaultBzOpts()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ip, []byte("cpio"), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := Load(testmem.New(testRAM), Config{KernelPath: kp, InitrdPath: ip, RAM: RAMRegions(testRAM), CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	if e.Initrd.Size != 4 {
		t.Errorf("initrd size %d, want 4", e.Initrd.Size)
	}
}

func TestRAMRegionsAndMemoryMap(t *testing.T) {
	for _, tc := range []struct {
		size uint64
		want []e820Entry
	}{
		{64 << 20, []e820Entry{{0, layout.EBDAStart, 1}, {layout.EBDAStart, 0x100000 - layout.EBDAStart, 2}, {0x100000, 63 << 20, 1}}},
		{4 << 30, []e820Entry{{0, layout.EBDAStart, 1}, {layout.EBDAStart, 0x100000 - layout.EBDAStart, 2},
			{0x100000, layout.MMIOGapStart - 0x100000, 1}, {1 << 32, 1 << 30, 1}}},
	} {
		l := &loader{ram: RAMRegions(tc.size)}
		got := l.memoryMap()
		if len(got) != len(tc.want) {
			t.Fatalf("size %#x: map %+v, want %+v", tc.size, got, tc.want)
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("size %#x: entry %d = %+v, want %+v", tc.size, i, got[i], tc.want[i])
			}
		}
	}
}

// TestRealBzImage parses and loads a distribution kernel when one is
// available (HPCVM_TEST_BZIMAGE or /boot/vmlinuz-*).
func TestRealBzImage(t *testing.T) {
	path := os.Getenv("HPCVM_TEST_BZIMAGE")
	if path == "" {
		m, _ := filepath.Glob("/boot/vmlinuz-*")
		if len(m) == 0 {
			t.Skip("no real kernel: set HPCVM_TEST_BZIMAGE or install one in /boot")
		}
		path = m[0]
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := parseBzImage(img)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	t.Logf("%s: protocol %#x, %d setup sectors, pref_address %#x, init_size %#x, xloadflags %#x",
		path, b.Version, b.SetupSects, b.PrefAddress, b.InitSize, b.XLoadFlags)
	const ram = 256 << 20
	mem := testmem.New(ram)
	e, err := Load(mem, Config{Kernel: img, Initrd: []byte("cpio"), Cmdline: "console=ttyS0", RAM: RAMRegions(ram), CPUs: 4})
	if err != nil {
		t.Fatal(err)
	}
	if e.Kernel.End() > e.Initrd.Start {
		t.Errorf("initrd %+v overlaps kernel %+v", e.Initrd, e.Kernel)
	}
	checkRegisters(t, mem, e)
}
