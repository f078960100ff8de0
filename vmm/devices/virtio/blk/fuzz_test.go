package blk

import (
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/devices/internal/fakemem"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
)

// FuzzRequest runs arbitrary request headers and buffer layouts through the
// request handler: it must never panic, must only report defined status
// codes, and must never claim to have written more than the chain holds.
func FuzzRequest(f *testing.F) {
	f.Add(uint32(TypeIn), uint64(0), uint32(16), uint32(513), false)
	f.Add(uint32(TypeOut), uint64(7), uint32(16+512), uint32(1), true)
	f.Add(uint32(TypeGetID), uint64(0), uint32(16), uint32(3), false)
	f.Add(uint32(TypeIn), uint64(1<<63), uint32(16), uint32(1025), false)
	f.Add(uint32(99), uint64(0), uint32(4), uint32(0), false)

	path := filepath.Join(f.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 16*SectorSize), 0o600); err != nil {
		f.Fatal(err)
	}
	disks := map[bool]*Blk{}
	for _, ro := range []bool{false, true} {
		b, err := New(Config{Path: path, ReadOnly: ro, ID: "fuzz", Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			f.Fatal(err)
		}
		f.Cleanup(func() { b.Close() })
		disks[ro] = b
	}

	f.Fuzz(func(t *testing.T, typ uint32, sector uint64, readable, writable uint32, ro bool) {
		const memSize = 64 << 10
		readable, writable = readable%(16<<10), writable%(16<<10)
		mem := fakemem.New(memSize)
		hdr := make([]byte, HeaderLen)
		binary.LittleEndian.PutUint32(hdr[0:], typ)
		binary.LittleEndian.PutUint64(hdr[8:], sector)
		mem.WriteAt(hdr[:min(int(readable), HeaderLen)], 0x1000)
		c := &virtio.Chain{}
		if readable > 0 {
			c.Descs = append(c.Descs, virtio.Desc{Addr: 0x1000, Len: readable})
		}
		if writable > 0 {
			c.Descs = append(c.Descs, virtio.Desc{Addr: 0x8000, Len: writable, Write: true})
		}
		env := &virtio.Env{Mem: mem}
		n, err := disks[ro].handle(env, c)
		if err != nil {
			return
		}
		if n > writable {
			t.Fatalf("used length %d exceeds writable %d", n, writable)
		}
		if n == 0 {
			return
		}
		st := make([]byte, 1)
		mem.ReadAt(st, int64(0x8000+writable-1))
		if st[0] > StatusUnsupp {
			t.Fatalf("status %d", st[0])
		}
		if ro && typ == TypeOut && st[0] != StatusIOErr {
			t.Fatalf("write to read-only disk got status %d", st[0])
		}
	})
}
