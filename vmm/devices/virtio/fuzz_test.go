package virtio

import (
	"encoding/binary"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/devices/internal/fakemem"
)

// Fixed ring layout inside the fuzzed memory image.
const (
	fzMem   = 8 << 10
	fzDesc  = 0x0
	fzAvail = 0x400 // room for 64 descriptors
	fzUsed  = 0x500
)

// FuzzQueueWalk feeds arbitrary guest memory (descriptor table, available
// ring, indirect tables, buffers) to Pop. It must never panic or hang, and
// whatever it accepts must be a sane chain.
func FuzzQueueWalk(f *testing.F) {
	seed := make([]byte, 0x480)
	// A valid two-descriptor chain at head 0, published once.
	binary.LittleEndian.PutUint64(seed[fzDesc:], 0x1000)
	binary.LittleEndian.PutUint32(seed[fzDesc+8:], 16)
	binary.LittleEndian.PutUint16(seed[fzDesc+12:], descFNext)
	binary.LittleEndian.PutUint16(seed[fzDesc+14:], 1)
	binary.LittleEndian.PutUint64(seed[fzDesc+16:], 0x1800)
	binary.LittleEndian.PutUint32(seed[fzDesc+24:], 8)
	binary.LittleEndian.PutUint16(seed[fzDesc+28:], descFWrite)
	binary.LittleEndian.PutUint16(seed[fzAvail+2:], 1)
	f.Add(seed, uint16(8), true)
	loop := append([]byte(nil), seed...)
	binary.LittleEndian.PutUint16(loop[fzDesc+28:], descFWrite|descFNext) // 1 -> 0 -> 1 ...
	f.Add(loop, uint16(8), false)
	indirect := append([]byte(nil), seed...)
	binary.LittleEndian.PutUint16(indirect[fzDesc+12:], descFIndirect)
	binary.LittleEndian.PutUint32(indirect[fzDesc+8:], 32)
	binary.LittleEndian.PutUint64(indirect[fzDesc:], fzDesc+16)
	f.Add(indirect, uint16(4), true)

	f.Fuzz(func(t *testing.T, image []byte, size uint16, indirect bool) {
		if size == 0 || size > 64 {
			return // the transport only builds queues of 1..max entries
		}
		mem := fakemem.New(fzMem)
		mem.WriteAt(image[:min(len(image), fzMem)], 0)
		q := NewQueue(mem, size, fzDesc, fzAvail, fzUsed, indirect, nil)
		for range 2 * int(size) {
			c, err := q.Pop()
			if err != nil || c == nil {
				return
			}
			if len(c.Descs) > 2*int(size) {
				t.Fatalf("chain of %d descriptors from a queue of %d", len(c.Descs), size)
			}
			var total uint64
			sawWrite := false
			for _, d := range c.Descs {
				if d.Addr+uint64(d.Len) < d.Addr {
					t.Fatalf("accepted overflowing buffer %#x+%#x", d.Addr, d.Len)
				}
				if !d.Write && sawWrite {
					t.Fatal("accepted readable after writable")
				}
				sawWrite = sawWrite || d.Write
				total += uint64(d.Len)
			}
			if total > 1<<32 {
				t.Fatalf("accepted %d bytes in one chain", total)
			}
			// Reading and writing the chain must fail cleanly, not panic.
			r := c.Reader(mem)
			buf := make([]byte, min(r.Remaining(), 4096))
			r.ReadFull(buf)
			w := c.Writer(mem)
			w.Write(make([]byte, min(w.Remaining(), 4096)))
			if err := q.PushUsed(c.Head, w.Written()); err != nil {
				return
			}
		}
	})
}
