package blk

import (
	"bytes"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/devices/internal/fakemem"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio/virtiotest"
)

const testSectors = 64

type rig struct {
	blk  *Blk
	m    *virtio.MMIO
	d    *virtiotest.Driver
	path string
	neg  uint64
}

func newRig(t *testing.T, readOnly bool) *rig {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	img := make([]byte, testSectors*SectorSize)
	for i := range img {
		img[i] = byte(i / SectorSize) // each sector filled with its number
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := New(Config{Path: path, ReadOnly: readOnly, ID: "hpcvm-disk-0", Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	mem := fakemem.New(4 << 20)
	irq := virtiotest.NewInterrupt()
	m := virtio.NewMMIO(b, mem, irq, slog.New(slog.DiscardHandler))
	d := virtiotest.New(m, mem, irq)
	t.Cleanup(func() {
		d.Close()
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	neg, err := d.Init(^uint64(0), []uint16{16}, 8192)
	if err != nil {
		t.Fatal(err)
	}
	return &rig{blk: b, m: m, d: d, path: path, neg: neg}
}

func header(typ uint32, sector uint64) []byte {
	h := make([]byte, HeaderLen)
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

// do submits a request and returns the device-written bytes (data then
// status, the status being the last byte).
func (r *rig) do(t *testing.T, bufs ...virtiotest.Buf) []byte {
	t.Helper()
	q := r.d.Queues[0]
	if _, err := q.Add(bufs...); err != nil {
		t.Fatal(err)
	}
	r.d.Kick(0)
	u, err := q.Wait(0)
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Written) == 0 {
		t.Fatal("device wrote nothing, not even a status byte")
	}
	return u.Written
}

func status(b []byte) byte { return b[len(b)-1] }

func TestConfigAndFeatures(t *testing.T) {
	tests := []struct {
		ro bool
	}{{false}, {true}}
	for _, tt := range tests {
		r := newRig(t, tt.ro)
		if got := r.neg&FeatureRO != 0; got != tt.ro {
			t.Errorf("ro=%v: VIRTIO_BLK_F_RO negotiated = %v", tt.ro, got)
		}
		if r.neg&(FeatureFlush|FeatureSegMax|FeatureSizeMax|virtio.FeatureVersion1) != FeatureFlush|FeatureSegMax|FeatureSizeMax|virtio.FeatureVersion1 {
			t.Errorf("negotiated %#x lacks FLUSH/SEG_MAX/SIZE_MAX/VERSION_1", r.neg)
		}
		var c [8]byte
		r.m.Read(virtiotest.RegConfig, c[:])
		if got := binary.LittleEndian.Uint64(c[:]); got != testSectors {
			t.Errorf("capacity = %d sectors, want %d", got, testSectors)
		}
		r.m.Read(virtiotest.RegConfig+12, c[:4])
		if got := binary.LittleEndian.Uint32(c[:4]); got != segMax {
			t.Errorf("seg_max = %d, want %d", got, segMax)
		}
	}
}

func TestReadWrite(t *testing.T) {
	r := newRig(t, false)
	got := r.do(t, virtiotest.Buf{Data: header(TypeIn, 3)}, virtiotest.Buf{Len: 2 * SectorSize, Write: true}, virtiotest.Buf{Len: 1, Write: true})
	if status(got) != StatusOK {
		t.Fatalf("read status %d", status(got))
	}
	want := append(bytes.Repeat([]byte{3}, SectorSize), bytes.Repeat([]byte{4}, SectorSize)...)
	if !bytes.Equal(got[:len(got)-1], want) {
		t.Fatal("read returned wrong sector contents")
	}

	data := bytes.Repeat([]byte("hpcvm!!\n"), 3*SectorSize/8)
	// Data split over two descriptors, header and data in one: any layout.
	got = r.do(t, virtiotest.Buf{Data: append(header(TypeOut, 10), data[:700]...)}, virtiotest.Buf{Data: data[700:]}, virtiotest.Buf{Len: 1, Write: true})
	if status(got) != StatusOK {
		t.Fatalf("write status %d", status(got))
	}
	got = r.do(t, virtiotest.Buf{Data: header(TypeIn, 10)}, virtiotest.Buf{Len: uint32(len(data)) + 1, Write: true})
	if status(got) != StatusOK || !bytes.Equal(got[:len(data)], data) {
		t.Fatalf("read back status %d, data equal %v", status(got), bytes.Equal(got[:len(data)], data))
	}
	if st := status(r.do(t, virtiotest.Buf{Data: header(TypeFlush, 0)}, virtiotest.Buf{Len: 1, Write: true})); st != StatusOK {
		t.Fatalf("flush status %d", st)
	}
	img, err := os.ReadFile(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img[10*SectorSize:13*SectorSize], data) {
		t.Error("written data is not in the image file")
	}
}

func TestIndirectRequest(t *testing.T) {
	r := newRig(t, false)
	q := r.d.Queues[0]
	if _, err := q.AddIndirect(virtiotest.Buf{Data: header(TypeIn, 7)}, virtiotest.Buf{Len: SectorSize, Write: true}, virtiotest.Buf{Len: 1, Write: true}); err != nil {
		t.Fatal(err)
	}
	r.d.Kick(0)
	u, err := q.Wait(0)
	if err != nil {
		t.Fatal(err)
	}
	if status(u.Written) != StatusOK || u.Written[0] != 7 {
		t.Errorf("indirect read: status %d first byte %d, want 0 and 7", status(u.Written), u.Written[0])
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		ro   bool
		bufs []virtiotest.Buf
		want byte
	}{
		{"write to read-only disk", true, []virtiotest.Buf{{Data: header(TypeOut, 0)}, {Data: make([]byte, SectorSize)}, {Len: 1, Write: true}}, StatusIOErr},
		{"read past end", false, []virtiotest.Buf{{Data: header(TypeIn, testSectors-1)}, {Len: 2 * SectorSize, Write: true}, {Len: 1, Write: true}}, StatusIOErr},
		{"write past end", false, []virtiotest.Buf{{Data: header(TypeOut, testSectors)}, {Data: make([]byte, SectorSize)}, {Len: 1, Write: true}}, StatusIOErr},
		{"huge sector", false, []virtiotest.Buf{{Data: header(TypeIn, 1<<62)}, {Len: SectorSize, Write: true}, {Len: 1, Write: true}}, StatusIOErr},
		{"partial sector", false, []virtiotest.Buf{{Data: header(TypeIn, 0)}, {Len: 100, Write: true}, {Len: 1, Write: true}}, StatusIOErr},
		{"short header", false, []virtiotest.Buf{{Data: header(TypeIn, 0)[:8]}, {Len: 1, Write: true}}, StatusIOErr},
		{"unsupported discard", false, []virtiotest.Buf{{Data: header(11, 0)}, {Data: make([]byte, 16)}, {Len: 1, Write: true}}, StatusUnsupp},
		{"read from read-only disk works", true, []virtiotest.Buf{{Data: header(TypeIn, 0)}, {Len: SectorSize, Write: true}, {Len: 1, Write: true}}, StatusOK},
		{"flush on read-only disk", true, []virtiotest.Buf{{Data: header(TypeFlush, 0)}, {Len: 1, Write: true}}, StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t, tt.ro)
			if st := status(r.do(t, tt.bufs...)); st != tt.want {
				t.Errorf("status %d, want %d", st, tt.want)
			}
		})
	}
}

func TestReadOnlyOpensRDONLY(t *testing.T) {
	r := newRig(t, true)
	if _, err := r.blk.file.WriteAt([]byte{1}, 0); err == nil {
		t.Error("read-only disk's file accepted a write")
	}
}

func TestGetID(t *testing.T) {
	r := newRig(t, false)
	got := r.do(t, virtiotest.Buf{Data: header(TypeGetID, 0)}, virtiotest.Buf{Len: IDLen, Write: true}, virtiotest.Buf{Len: 1, Write: true})
	if status(got) != StatusOK {
		t.Fatalf("GET_ID status %d", status(got))
	}
	want := make([]byte, IDLen)
	copy(want, "hpcvm-disk-0")
	if !bytes.Equal(got[:IDLen], want) {
		t.Errorf("GET_ID = %q, want %q", got[:IDLen], want)
	}
}

func TestNewErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"missing file", Config{Path: filepath.Join(t.TempDir(), "nope")}},
		{"serial too long", Config{Path: os.DevNull, ID: "0123456789012345678901"}},
	}
	for _, tt := range tests {
		if b, err := New(tt.cfg); err == nil {
			b.Close()
			t.Errorf("%s: New succeeded", tt.name)
		}
	}
}

func TestState(t *testing.T) {
	r := newRig(t, false)
	s := r.blk.State()
	if err := r.blk.Restore(s); err != nil {
		t.Errorf("restore of own state: %v", err)
	}
	s.Capacity++
	if err := r.blk.Restore(s); err == nil {
		t.Error("restore accepted a different capacity")
	}
}

func TestParseHeader(t *testing.T) {
	h, err := ParseHeader(header(TypeOut, 0x1122334455))
	if err != nil || h.Type != TypeOut || h.Sector != 0x1122334455 {
		t.Errorf("ParseHeader = %+v, %v", h, err)
	}
	if _, err := ParseHeader(make([]byte, 15)); err == nil {
		t.Error("ParseHeader accepted 15 bytes")
	}
}
