package virtio

import (
	"encoding/binary"
	"math"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Split virtqueue layout (virtio 1.x §2.7).
const (
	descSize = 16

	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4

	availFNoInterrupt = 1

	// MaxQueueSize is the largest split virtqueue the spec allows.
	MaxQueueSize = 32768
)

// Desc is one guest buffer of a descriptor chain.
type Desc struct {
	Addr  uint64
	Len   uint32
	Write bool // device-writable (else device-readable)
}

// Chain is a descriptor chain popped from the available ring: device-
// readable buffers first, then device-writable ones.
type Chain struct {
	Head  uint16
	Descs []Desc
}

// Lens returns the total device-readable and device-writable byte counts.
func (c *Chain) Lens() (readable, writable uint64) {
	for _, d := range c.Descs {
		if d.Write {
			writable += uint64(d.Len)
		} else {
			readable += uint64(d.Len)
		}
	}
	return readable, writable
}

// Queue is the device side of an enabled split virtqueue. The guest-physical
// ring addresses are fixed while the device is active; the ring indices are
// guarded by a mutex so State can be read while a worker runs.
type Queue struct {
	mem      memory.Guest
	size     uint16
	desc     uint64
	avail    uint64
	used     uint64
	indirect bool // VIRTIO_F_RING_INDIRECT_DESC negotiated
	signal   func()

	mu        sync.Mutex
	lastAvail uint16
	nextUsed  uint16
}

// NewQueue returns a queue over guest memory. It is exported for tests and
// fuzzers; devices receive their queues from the transport.
func NewQueue(mem memory.Guest, size uint16, desc, avail, used uint64, indirect bool, signal func()) *Queue {
	if signal == nil {
		signal = func() {}
	}
	return &Queue{mem: mem, size: size, desc: desc, avail: avail, used: used, indirect: indirect, signal: signal}
}

// Size is the negotiated queue size.
func (q *Queue) Size() uint16 { return q.size }

// Indices returns the next available-ring slot the device will consume and
// the next used-ring slot it will fill.
func (q *Queue) Indices() (lastAvail, nextUsed uint16) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.lastAvail, q.nextUsed
}

// SetIndices restores ring positions (snapshot restore).
func (q *Queue) SetIndices(lastAvail, nextUsed uint16) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.lastAvail, q.nextUsed = lastAvail, nextUsed
}

func (q *Queue) read16(addr uint64) (uint16, error) {
	var b [2]byte
	if _, err := q.mem.ReadAt(b[:], int64(addr)); err != nil {
		return 0, errorf("read at %#x: %w", addr, err)
	}
	return binary.LittleEndian.Uint16(b[:]), nil
}

func (q *Queue) write16(addr uint64, v uint16) error {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	if _, err := q.mem.WriteAt(b[:], int64(addr)); err != nil {
		return errorf("write at %#x: %w", addr, err)
	}
	return nil
}

// Pop takes the next descriptor chain from the available ring. It returns
// (nil, nil) when the ring is empty and an error when the driver has laid
// out something invalid; the device must then stop using the queue.
func (q *Queue) Pop() (*Chain, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	idx, err := q.read16(q.avail + 2)
	if err != nil {
		return nil, err
	}
	pending := idx - q.lastAvail
	if pending == 0 {
		return nil, nil
	}
	if pending > q.size {
		return nil, errorf("available index %d is %d entries ahead of %d, more than queue size %d", idx, pending, q.lastAvail, q.size)
	}
	head, err := q.read16(q.avail + 4 + 2*uint64(q.lastAvail%q.size))
	if err != nil {
		return nil, err
	}
	c, err := q.walk(head)
	if err != nil {
		return nil, err
	}
	q.lastAvail++
	return c, nil
}

// Pending reports whether the available ring holds chains not yet popped.
func (q *Queue) Pending() (bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	idx, err := q.read16(q.avail + 2)
	return idx != q.lastAvail, err
}

// Undo returns the most recently popped chain to the available ring; the
// next Pop yields it again. Devices use it when they run out of room.
func (q *Queue) Undo() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.lastAvail--
}

// walk follows the chain starting at head. Every way a guest can make the
// walk misbehave (index out of range, loops, nested or malformed indirect
// tables, overflowing addresses or lengths) is an error; the walk visits at
// most size + (indirect table length) descriptors.
func (q *Queue) walk(head uint16) (*Chain, error) {
	c := &Chain{Head: head}
	table, tableLen := q.desc, uint32(q.size)
	inIndirect, sawWrite := false, false
	var total uint64
	idx := uint32(head)
	var raw [descSize]byte
	for visited := uint32(0); ; visited++ {
		if idx >= tableLen {
			return nil, errorf("chain %d: descriptor index %d out of range (table of %d)", head, idx, tableLen)
		}
		if visited >= tableLen {
			return nil, errorf("chain %d: longer than its table of %d descriptors (loop?)", head, tableLen)
		}
		at := table + uint64(idx)*descSize
		if _, err := q.mem.ReadAt(raw[:], int64(at)); err != nil {
			return nil, errorf("chain %d: read descriptor %d at %#x: %w", head, idx, at, err)
		}
		addr := binary.LittleEndian.Uint64(raw[0:])
		n := binary.LittleEndian.Uint32(raw[8:])
		flags := binary.LittleEndian.Uint16(raw[12:])
		next := binary.LittleEndian.Uint16(raw[14:])

		if flags&descFIndirect != 0 {
			switch {
			case !q.indirect:
				return nil, errorf("chain %d: indirect descriptor but VIRTIO_F_RING_INDIRECT_DESC not negotiated", head)
			case inIndirect:
				return nil, errorf("chain %d: nested indirect descriptor", head)
			case flags&descFNext != 0:
				return nil, errorf("chain %d: indirect descriptor with NEXT set", head)
			case n == 0 || n%descSize != 0:
				return nil, errorf("chain %d: indirect table length %d is not a positive multiple of %d", head, n, descSize)
			case n/descSize > uint32(q.size):
				return nil, errorf("chain %d: indirect table of %d descriptors exceeds queue size %d", head, n/descSize, q.size)
			case addr > math.MaxUint64-uint64(n):
				return nil, errorf("chain %d: indirect table at %#x+%#x overflows", head, addr, n)
			}
			table, tableLen, idx, visited = addr, n/descSize, 0, ^uint32(0) // visited wraps to 0
			inIndirect = true
			continue
		}
		if addr > math.MaxUint64-uint64(n) {
			return nil, errorf("chain %d: buffer %#x+%#x overflows", head, addr, n)
		}
		w := flags&descFWrite != 0
		if !w && sawWrite {
			return nil, errorf("chain %d: device-readable buffer after a device-writable one", head)
		}
		sawWrite = sawWrite || w
		total += uint64(n)
		if total > math.MaxUint32 {
			return nil, errorf("chain %d: total length exceeds 4 GiB", head)
		}
		c.Descs = append(c.Descs, Desc{Addr: addr, Len: n, Write: w})
		if flags&descFNext == 0 {
			return c, nil
		}
		idx = uint32(next)
	}
}

// PushUsed returns chain head to the driver with n bytes written into its
// device-writable buffers. It does not interrupt; call Signal after a batch.
func (q *Queue) PushUsed(head uint16, n uint32) error {
	if head >= q.size {
		return errorf("used head %d out of range (size %d)", head, q.size)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	var e [8]byte
	binary.LittleEndian.PutUint32(e[0:], uint32(head))
	binary.LittleEndian.PutUint32(e[4:], n)
	at := q.used + 4 + 8*uint64(q.nextUsed%q.size)
	if _, err := q.mem.WriteAt(e[:], int64(at)); err != nil {
		return errorf("write used element at %#x: %w", at, err)
	}
	// The element must be visible before the index that publishes it.
	q.nextUsed++
	return q.write16(q.used+2, q.nextUsed)
}

// Signal sends a used-buffer notification unless the driver suppressed it
// with VIRTQ_AVAIL_F_NO_INTERRUPT.
func (q *Queue) Signal() {
	if flags, err := q.read16(q.avail); err == nil && flags&availFNoInterrupt != 0 {
		return
	}
	q.signal()
}
