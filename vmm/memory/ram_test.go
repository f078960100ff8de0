package memory

import (
	"bytes"
	"testing"
)

func TestRAMSplitsAroundGap(t *testing.T) {
	const gap = 1 << 20
	r, err := NewRAM(3<<20, gap)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	regs := r.Regions()
	if len(regs) != 2 || regs[0].GPA != 0 || regs[0].End() != gap || regs[1].GPA != 1<<32 || len(regs[1].Host) != 2<<20 {
		t.Fatalf("regions = %+v", regs)
	}
	if r.Size() != 3<<20 {
		t.Fatalf("size %d", r.Size())
	}
}

func TestRAMReadWrite(t *testing.T) {
	r, err := NewRAM(2<<20, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	want := []byte("hello guest")
	if _, err := r.WriteAt(want, 0x1000-3); err != nil { // crosses a page boundary
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := r.ReadAt(got, 0x1000-3); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got %q want %q", got, want)
	}
	if _, err := r.ReadAt(got, 2<<20-4); err == nil {
		t.Fatal("read past end of RAM succeeded")
	}
}

func TestRAMRejectsBadSize(t *testing.T) {
	for _, sz := range []uint64{0, 100} {
		if _, err := NewRAM(sz, 1<<30); err == nil {
			t.Errorf("NewRAM(%d) succeeded", sz)
		}
	}
}
