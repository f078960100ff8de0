package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/layout"
)

// Offsets in a bzImage and in struct boot_params (the zero page), which
// embeds the same setup header at the same offsets
// (Documentation/arch/x86/boot.rst, zero-page.rst).
const (
	hdrStart         = 0x1f1 // setup_sects: first byte of the setup header
	hdrBootFlag      = 0x1fe // 0xAA55
	hdrJump          = 0x200 // 2-byte jump; its second byte sizes the header
	hdrMagicOff      = 0x202 // "HdrS"
	hdrVersion       = 0x206
	hdrTypeOfLoader  = 0x210
	hdrLoadFlags     = 0x211
	hdrCode32Start   = 0x214
	hdrRamdiskImage  = 0x218
	hdrRamdiskSize   = 0x21c
	hdrCmdLinePtr    = 0x228
	hdrInitrdAddrMax = 0x22c
	hdrKernelAlign   = 0x230
	hdrRelocatable   = 0x234
	hdrXLoadFlags    = 0x236
	hdrCmdlineSize   = 0x238
	hdrPrefAddress   = 0x258
	hdrInitSize      = 0x260
	hdrEndV212       = 0x268 // end of the fields this loader reads

	bpACPIRSDPAddr = 0x070
	bpE820Entries  = 0x1e8
	bpHdrMax       = 0x290 // the setup header must end before edd_mbr_sig_buffer
	bpE820Table    = 0x2d0
	bpE820Max      = 128
	bpSize         = 0x1000

	loadedHigh   = 1 << 0 // loadflags: protected-mode code at 1 MiB
	xlfKernel64  = 1 << 0 // xloadflags: has the 64-bit entry at +0x200
	entry64Off   = 0x200
	minVersion   = 0x0206 // cmdline_size appeared in 2.06
	rsdpVersion  = 0x020e // acpi_rsdp_addr is honoured from 2.14
	loaderUnreg  = 0xff   // type_of_loader: undefined boot loader
	bzBootFlag   = 0xaa55
	bzMagic      = "HdrS"
	defaultSects = 4 // setup_sects 0 means 4
)

// bzImage is a parsed bzImage: the setup header fields the loader needs.
type bzImage struct {
	Version         uint16
	SetupSects      int
	LoadFlags       uint8
	XLoadFlags      uint16
	InitrdAddrMax   uint32
	KernelAlignment uint32
	Relocatable     bool
	CmdlineSize     uint32
	PrefAddress     uint64
	InitSize        uint32
	// Header is the raw setup header, image[hdrStart:end of header].
	Header []byte
	// Kernel is the protected-mode kernel (after the setup sectors).
	Kernel []byte
}

func isBzImage(img []byte) bool {
	return len(img) >= hdrMagicOff+4 && string(img[hdrMagicOff:hdrMagicOff+4]) == bzMagic
}

// parseBzImage validates a bzImage's setup header. It only reads img, which
// may be anything the user passed as --kernel.
func parseBzImage(img []byte) (*bzImage, error) {
	if !isBzImage(img) {
		return nil, fmt.Errorf("not a bzImage (no %q magic at %#x)", bzMagic, hdrMagicOff)
	}
	le := binary.LittleEndian
	if len(img) < hdrVersion+2 {
		return nil, fmt.Errorf("bzImage truncated: %d bytes, shorter than its boot protocol version field", len(img))
	}
	if f := le.Uint16(img[hdrBootFlag:]); f != bzBootFlag {
		return nil, fmt.Errorf("bzImage boot_flag is %#04x, want %#04x", f, bzBootFlag)
	}
	b := &bzImage{Version: le.Uint16(img[hdrVersion:])}
	if b.Version < minVersion {
		return nil, fmt.Errorf("bzImage boot protocol %d.%02d is too old (need 2.06 or later)", b.Version>>8, b.Version&0xff)
	}
	hdrEnd := hdrMagicOff + int(img[hdrJump+1])
	if hdrEnd < hdrCmdlineSize+4 || hdrEnd > bpHdrMax {
		return nil, fmt.Errorf("bzImage setup header ends at %#x, outside [%#x, %#x]", hdrEnd, hdrCmdlineSize+4, bpHdrMax)
	}
	if hdrEnd > len(img) {
		return nil, fmt.Errorf("bzImage truncated: %d bytes, setup header ends at %#x", len(img), hdrEnd)
	}
	b.Header = img[hdrStart:hdrEnd]
	b.SetupSects = int(img[hdrStart])
	if b.SetupSects == 0 {
		b.SetupSects = defaultSects
	}
	b.LoadFlags = img[hdrLoadFlags]
	b.InitrdAddrMax = le.Uint32(img[hdrInitrdAddrMax:])
	b.KernelAlignment = le.Uint32(img[hdrKernelAlign:])
	b.Relocatable = img[hdrRelocatable] != 0
	b.XLoadFlags = le.Uint16(img[hdrXLoadFlags:])
	b.CmdlineSize = le.Uint32(img[hdrCmdlineSize:])
	if hdrEnd >= hdrInitSize+4 {
		b.PrefAddress = le.Uint64(img[hdrPrefAddress:])
		b.InitSize = le.Uint32(img[hdrInitSize:])
	}
	setupSize := (b.SetupSects + 1) * 512
	if setupSize >= len(img) {
		return nil, fmt.Errorf("bzImage truncated: %d bytes, but its %d setup sectors end at %#x", len(img), b.SetupSects, setupSize)
	}
	b.Kernel = img[setupSize:]
	if b.LoadFlags&loadedHigh == 0 {
		return nil, fmt.Errorf("bzImage is a zImage (LOADED_HIGH not set in loadflags %#02x); only bzImages are supported", b.LoadFlags)
	}
	if b.XLoadFlags&xlfKernel64 == 0 {
		return nil, fmt.Errorf("bzImage (boot protocol %d.%02d) has no 64-bit entry point (XLF_KERNEL_64 not set); hpcvm boots 64-bit kernels",
			b.Version>>8, b.Version&0xff)
	}
	if b.PrefAddress >= layout.MMIOGapEnd {
		return nil, fmt.Errorf("bzImage pref_address %#x is above 4 GiB", b.PrefAddress)
	}
	if b.Relocatable && (b.KernelAlignment == 0 || b.KernelAlignment&(b.KernelAlignment-1) != 0) {
		return nil, fmt.Errorf("bzImage kernel_alignment %#x is not a power of two", b.KernelAlignment)
	}
	return b, nil
}

// footprint is the memory the kernel occupies once running: the loaded
// image at load, plus init_size bytes at its runtime address
// (boot.rst, "init_size").
func (b *bzImage) footprint(load uint64) (start, end uint64) {
	runtime := b.PrefAddress
	if b.Relocatable {
		runtime = max(load, b.PrefAddress)
		a := uint64(b.KernelAlignment)
		runtime = (runtime + a - 1) &^ (a - 1)
	}
	if b.PrefAddress == 0 && !b.Relocatable {
		runtime = load
	}
	end = max(load+uint64(len(b.Kernel)), runtime+uint64(b.InitSize))
	return min(load, runtime), end
}

func (l *loader) loadBzImage() (*Entry, error) {
	b, err := parseBzImage(l.kernel)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", l.kname, err)
	}
	load := uint64(layout.HighMemStart)
	kstart, kend := b.footprint(load)
	if kstart < layout.HighMemStart || kend > l.lowEnd() {
		return nil, fmt.Errorf("%s: kernel needs RAM [%#x, %#x) (image %d bytes, init_size %#x at %#x); low RAM is [0, %#x)",
			l.kname, kstart, kend, len(b.Kernel), b.InitSize, b.PrefAddress, l.lowEnd())
	}
	if err := l.write(load, b.Kernel, l.kname); err != nil {
		return nil, err
	}
	if err := l.writeCmdline(uint64(b.CmdlineSize)); err != nil {
		return nil, fmt.Errorf("%s: %w", l.kname, err)
	}
	initrd, err := l.placeInitrd(uint64(b.InitrdAddrMax)+1, kend)
	if err != nil {
		return nil, err
	}
	rsdp, err := l.writeACPI()
	if err != nil {
		return nil, err
	}
	zp, err := l.zeroPage(b, load, initrd, rsdp)
	if err != nil {
		return nil, err
	}
	if err := l.write(layout.ZeroPageAddr, zp, "zero page"); err != nil {
		return nil, err
	}
	if err := l.writeGDT(); err != nil {
		return nil, err
	}
	if err := l.writePageTables(); err != nil {
		return nil, err
	}
	return &Entry{
		Protocol: BzImage64,
		IP:       load + entry64Off,
		BootInfo: layout.ZeroPageAddr,
		RSDP:     rsdp,
		Kernel:   Region{kstart, kend - kstart},
		Initrd:   initrd,
	}, nil
}

// zeroPage builds struct boot_params.
func (l *loader) zeroPage(b *bzImage, load uint64, initrd Region, rsdp uint64) ([]byte, error) {
	le := binary.LittleEndian
	zp := make([]byte, bpSize)
	copy(zp[hdrStart:], b.Header)
	zp[hdrTypeOfLoader] = loaderUnreg
	le.PutUint32(zp[hdrCode32Start:], uint32(load))
	le.PutUint32(zp[hdrCmdLinePtr:], layout.CmdlineAddr)
	le.PutUint32(zp[hdrRamdiskImage:], uint32(initrd.Start))
	le.PutUint32(zp[hdrRamdiskSize:], uint32(initrd.Size))
	if b.Version >= rsdpVersion {
		le.PutUint64(zp[bpACPIRSDPAddr:], rsdp)
	}
	m := l.memoryMap()
	if len(m) > bpE820Max {
		return nil, fmt.Errorf("e820 map has %d entries, boot_params holds %d", len(m), bpE820Max)
	}
	zp[bpE820Entries] = uint8(len(m))
	for i, e := range m {
		o := bpE820Table + 20*i
		le.PutUint64(zp[o:], e.Addr)
		le.PutUint64(zp[o+8:], e.Size)
		le.PutUint32(zp[o+16:], e.Type)
	}
	return zp, nil
}
