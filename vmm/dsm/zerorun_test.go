package dsm

import (
	"bytes"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestFirstTouchFillsZeroRun: slice 0's first touch of untouched RAM
// populates the touched page's aligned window in one go, stopping at a
// page slice 0 no longer holds; the other slice still reads the run's
// pages as zeros and the touched page's new byte, and its writes to a
// page of the run are seen by slice 0.
func TestFirstTouchFillsZeroRun(t *testing.T) {
	p := newNodePair(t, nil)
	pp := newPipe(t)
	const base = 0x400 // a window of zeroRunPages pages
	const cut = base + 0x12
	const touched = base + 5
	one := []byte{0x77}
	// Slice 1 takes page cut before slice 0 touches anything there.
	if _, err := p.nodes[1].WriteAt(one, cut*PageSize); err != nil {
		t.Fatal(err)
	}
	pp.kernelWrite(t, p.nodes[0].hostPage(touched), 0x5a)
	if got, want := p.nodes[0].Stats.ZeroFilled.Load(), int64(cut-base); got != want {
		t.Fatalf("slice 0 zero-filled %d pages, want %d (window from %#x up to the page slice 1 took at %#x)", got, want, base, cut)
	}
	for j := base; j < base+zeroRunPages; j++ {
		pg := &p.nodes[0].pages[j]
		pg.mu.Lock()
		mapped, st := pg.mapped, pg.st
		pg.mu.Unlock()
		if wantMapped := j < cut; mapped != wantMapped {
			t.Errorf("page %#x: mapped %v on slice 0, want %v (state %v)", j, mapped, wantMapped, st)
		}
	}

	b := make([]byte, PageSize)
	for _, j := range []int{base, base + 0x10, base + 0x11} {
		if _, err := p.nodes[1].ReadAt(b, int64(j*PageSize)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, make([]byte, PageSize)) {
			t.Errorf("slice 1 reads page %#x of the run: not zeros", j)
		}
	}
	if _, err := p.nodes[1].ReadAt(b[:1], touched*PageSize); err != nil || b[0] != 0x5a {
		t.Errorf("slice 1 reads the touched page %#x: %#x, %v; want 0x5a", touched, b[0], err)
	}
	if _, err := p.nodes[1].WriteAt([]byte{0x33}, (base+0x10)*PageSize+9); err != nil {
		t.Fatal(err)
	}
	if _, err := p.nodes[0].ReadAt(b[:10], (base+0x10)*PageSize); err != nil || b[9] != 0x33 {
		t.Errorf("slice 0 reads byte 9 of page %#x after slice 1 wrote 0x33: %#x, %v", base+0x10, b[9], err)
	}
	if _, err := p.nodes[0].ReadAt(b[:1], cut*PageSize); err != nil || b[0] != 0x77 {
		t.Errorf("slice 0 reads page %#x slice 1 wrote: %#x, %v; want 0x77", cut, b[0], err)
	}
}

// TestFirstTouchSinglePage: with ZeroRunPages 1 a first touch populates
// the touched page only.
func TestFirstTouchSinglePage(t *testing.T) {
	p := newNodesWith(t, 2, nil, func(_ int, c *NodeConfig) { c.ZeroRunPages = 1 })
	pp := newPipe(t)
	pp.kernelWrite(t, p.nodes[0].hostPage(0x405), 1)
	if got := p.nodes[0].Stats.ZeroFilled.Load(); got != 0 {
		t.Errorf("ZeroFilled %d with runs off, want 0", got)
	}
	pg := &p.nodes[0].pages[0x406]
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if pg.mapped {
		t.Errorf("the neighbour 0x406 was populated with runs off")
	}
}

// BenchmarkFirstTouch: slice 0 writes one byte into each of 4096
// untouched pages in address order (a booting guest's RAM), each write a
// userfaultfd missing fault unless an earlier fill populated the page;
// per run length (1: one page per fault, as before runs); the
// reference is the same writes to fresh anonymous memory no userfaultfd
// watches (plain: the kernel's own first-touch cost, as for a VM on one
// node).
func BenchmarkFirstTouch(b *testing.B) {
	const pages = 4096
	b.Run("plain", func(b *testing.B) {
		var per time.Duration
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			mem, err := unix.Mmap(-1, 0, pages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				b.Fatal(err)
			}
			if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
				b.Fatal(err)
			}
			pp := newPipe(b)
			b.StartTimer()
			t0 := time.Now()
			for j := 0; j < pages; j++ {
				pp.kernelWrite(b, mem[j*PageSize:], 1)
			}
			per += time.Since(t0)
			b.StopTimer()
			unix.Munmap(mem)
			b.StartTimer()
		}
		b.ReportMetric(float64(per.Nanoseconds())/float64(b.N*pages)/1e3, "us/page")
	})
	for _, run := range []int{1, zeroRunPages} {
		b.Run("run="+strconv.Itoa(run), func(b *testing.B) {
			var per time.Duration
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				p := newNodesWith(b, 2, nil, func(_ int, c *NodeConfig) { c.ZeroRunPages = run })
				pp := newPipe(b)
				b.StartTimer()
				t0 := time.Now()
				for j := 0; j < pages; j++ {
					pp.kernelWrite(b, p.nodes[0].hostPage(0x1000+j), 1)
				}
				per += time.Since(t0)
			}
			b.ReportMetric(float64(per.Nanoseconds())/float64(b.N*pages)/1e3, "us/page")
		})
	}
}
