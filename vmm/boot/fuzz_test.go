package boot

import (
	"bytes"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/boot/internal/testmem"
)

// The kernel file is untrusted input: any file can be passed as --kernel.
// The parsers must reject bad input with an error, never panic, and what
// they accept must be consistent with the image.

func FuzzParseBzImage(f *testing.F) {
	good := makeBzImage(defaultBzOpts())
	f.Add(good)
	f.Add(good[:0x270])
	f.Add(makeBzImage(bzOpts{version: 0x0206, loadFlags: 1, xloadFlags: 1, kernelSize: 16}))
	f.Add([]byte("HdrS"))
	f.Fuzz(func(t *testing.T, img []byte) {
		b, err := parseBzImage(img)
		if err != nil {
			return
		}
		if len(b.Kernel) == 0 || !bytes.Equal(b.Kernel, img[len(img)-len(b.Kernel):]) || len(b.Kernel)+(b.SetupSects+1)*512 != len(img) {
			t.Fatalf("kernel part (%d bytes) is not the image after %d setup sectors", len(b.Kernel), b.SetupSects)
		}
		if b.Version < minVersion || b.LoadFlags&loadedHigh == 0 || b.XLoadFlags&xlfKernel64 == 0 {
			t.Fatalf("accepted version %#x loadflags %#x xloadflags %#x", b.Version, b.LoadFlags, b.XLoadFlags)
		}
		if hdrStart+len(b.Header) > bpHdrMax {
			t.Fatalf("header of %d bytes overruns boot_params", len(b.Header))
		}
		start, end := b.footprint(1 << 20)
		if end < start {
			t.Fatalf("footprint [%#x, %#x) wraps", start, end)
		}
	})
}

func FuzzParsePVH(f *testing.F) {
	f.Add(testPVHKernel())
	f.Add(makeELF([]elfSeg{{typ: ptNote, data: pvhNote(0x1000000)}}))
	f.Add(makeELF([]elfSeg{{typ: ptLoad, paddr: 0x1000000, data: []byte{1}}, {typ: ptNote, data: note("Xen", xenElfnotePhys32, make([]byte, 8))}}))
	f.Fuzz(func(t *testing.T, img []byte) {
		k, err := parsePVH(img)
		if err != nil {
			return
		}
		for i, s := range k.Segments {
			if s.Offset+s.Filesz > uint64(len(img)) || s.Filesz > s.Memsz || s.Paddr+s.Memsz < s.Paddr {
				t.Fatalf("accepted segment %d %+v of a %d-byte file", i, s, len(img))
			}
		}
	})
}

// FuzzLoad runs whole loads into a small guest, so the placement and
// size checks are exercised with hostile headers too.
func FuzzLoad(f *testing.F) {
	f.Add(makeBzImage(defaultBzOpts()), []byte("initrd"), "console=ttyS0")
	f.Add(testPVHKernel(), []byte{}, "")
	f.Fuzz(func(t *testing.T, kernel, initrd []byte, cmdline string) {
		const ram = 24 << 20
		e, err := Load(testmem.New(ram), Config{Kernel: kernel, Initrd: initrd, Cmdline: cmdline, RAM: RAMRegions(ram), CPUs: 1})
		if err != nil {
			return
		}
		if e.Kernel.End() > ram || (e.Initrd.Size > 0 && (e.Initrd.Start < e.Kernel.End() || e.Initrd.End() > ram)) {
			t.Fatalf("kernel %+v initrd %+v in %#x bytes of RAM", e.Kernel, e.Initrd, ram)
		}
	})
}
