// Package virtiotest is a tiny virtio-mmio "guest driver" for device tests:
// it lays out split virtqueues in fake guest memory, programs the transport
// registers in the order Linux does, adds buffers, kicks queues and waits for
// used entries via the interrupt line.
package virtiotest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/devices/internal/fakemem"
)

// Transport register offsets the driver uses (mirrors the virtio package).
const (
	RegMagic           = 0x000
	RegVersion         = 0x004
	RegDeviceID        = 0x008
	RegDeviceFeatures  = 0x010
	RegDeviceFeatSel   = 0x014
	RegDriverFeatures  = 0x020
	RegDriverFeatSel   = 0x024
	RegQueueSel        = 0x030
	RegQueueNumMax     = 0x034
	RegQueueNum        = 0x038
	RegQueueReady      = 0x044
	RegQueueNotify     = 0x050
	RegInterruptStatus = 0x060
	RegInterruptACK    = 0x064
	RegStatus          = 0x070
	RegQueueDescLow    = 0x080
	RegQueueDescHigh   = 0x084
	RegQueueDriverLow  = 0x090
	RegQueueDriverHigh = 0x094
	RegQueueDeviceLow  = 0x0a0
	RegQueueDeviceHigh = 0x0a4
	RegConfigGen       = 0x0fc
	RegConfig          = 0x100
)

// DefaultTimeout bounds every wait so a broken device fails a test instead
// of hanging it.
const DefaultTimeout = 10 * time.Second

// Interrupt is a bus.Interrupt that counts triggers and wakes the driver.
type Interrupt struct {
	n  atomic.Int64
	ch chan struct{}
}

// NewInterrupt returns an untriggered interrupt line.
func NewInterrupt() *Interrupt { return &Interrupt{ch: make(chan struct{}, 1)} }

// Trigger implements bus.Interrupt.
func (i *Interrupt) Trigger() error {
	i.n.Add(1)
	select {
	case i.ch <- struct{}{}:
	default:
	}
	return nil
}

// Count is the number of triggers so far.
func (i *Interrupt) Count() int64 { return i.n.Load() }

// C receives after triggers (coalesced).
func (i *Interrupt) C() <-chan struct{} { return i.ch }

// Driver drives one virtio-mmio device.
type Driver struct {
	Mem *fakemem.Mem
	Dev bus.Device
	IRQ *Interrupt

	mu     sync.Mutex
	next   uint64
	wake   chan struct{}
	status uint32 // InterruptStatus bits seen by the handler, accumulated
	Queues []*Queue

	stop chan struct{}
	done chan struct{}
}

// New returns a driver for dev over mem. Guest memory below 0x1000 is left
// unused so that address 0 never looks valid.
func New(dev bus.Device, mem *fakemem.Mem, irq *Interrupt) *Driver {
	d := &Driver{Mem: mem, Dev: dev, IRQ: irq, next: 0x1000, wake: make(chan struct{}),
		stop: make(chan struct{}), done: make(chan struct{})}
	go d.handleIRQ()
	return d
}

// handleIRQ is the driver's interrupt handler: read status, ACK, wake waiters.
func (d *Driver) handleIRQ() {
	defer close(d.done)
	for {
		select {
		case <-d.stop:
			return
		case <-d.IRQ.C():
		}
		st := d.Read32(RegInterruptStatus)
		d.Write32(RegInterruptACK, st)
		d.mu.Lock()
		d.status |= st
		close(d.wake)
		d.wake = make(chan struct{})
		d.mu.Unlock()
	}
}

// SeenInterrupts returns the InterruptStatus bits the handler has seen.
func (d *Driver) SeenInterrupts() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

// Close stops the interrupt handler.
func (d *Driver) Close() {
	close(d.stop)
	<-d.done
}

// Read32 reads a transport register.
func (d *Driver) Read32(off uint64) uint32 {
	var b [4]byte
	d.Dev.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// Write32 writes a transport register.
func (d *Driver) Write32(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.Dev.Write(off, b[:])
}

// Alloc reserves size bytes of guest memory aligned to align.
func (d *Driver) Alloc(size, align uint64) (uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	at := (d.next + align - 1) &^ (align - 1)
	if at+size > d.Mem.Size() {
		return 0, fmt.Errorf("virtiotest: out of fake guest memory allocating %d bytes", size)
	}
	d.next = at + size
	return at, nil
}

// Init resets the device and negotiates: it accepts the offered features
// that are also in want, sets up one queue per entry in sizes (each with
// that size, at most QueueNumMax) whose buffers hold up to slot bytes per
// descriptor, and sets DRIVER_OK. It returns the negotiated features.
func (d *Driver) Init(want uint64, sizes []uint16, slot uint32) (uint64, error) {
	if m := d.Read32(RegMagic); m != 0x74726976 {
		return 0, fmt.Errorf("virtiotest: bad magic %#x", m)
	}
	if v := d.Read32(RegVersion); v != 2 {
		return 0, fmt.Errorf("virtiotest: transport version %d, want 2", v)
	}
	d.Write32(RegStatus, 0)
	d.Write32(RegStatus, 1)
	d.Write32(RegStatus, 1|2)
	d.Write32(RegDeviceFeatSel, 0)
	offered := uint64(d.Read32(RegDeviceFeatures))
	d.Write32(RegDeviceFeatSel, 1)
	offered |= uint64(d.Read32(RegDeviceFeatures)) << 32
	neg := offered & want
	d.Write32(RegDriverFeatSel, 0)
	d.Write32(RegDriverFeatures, uint32(neg))
	d.Write32(RegDriverFeatSel, 1)
	d.Write32(RegDriverFeatures, uint32(neg>>32))
	d.Write32(RegStatus, 1|2|8)
	if d.Read32(RegStatus)&8 == 0 {
		return neg, fmt.Errorf("virtiotest: device refused FEATURES_OK for features %#x", neg)
	}
	d.Queues = nil
	for i, sz := range sizes {
		d.Write32(RegQueueSel, uint32(i))
		if d.Read32(RegQueueReady) != 0 {
			return neg, fmt.Errorf("virtiotest: queue %d ready before setup", i)
		}
		max := d.Read32(RegQueueNumMax)
		if max == 0 {
			return neg, fmt.Errorf("virtiotest: queue %d does not exist", i)
		}
		if uint32(sz) > max {
			sz = uint16(max)
		}
		q, err := d.newQueue(i, sz, slot)
		if err != nil {
			return neg, err
		}
		d.Write32(RegQueueNum, uint32(sz))
		d.Write32(RegQueueDescLow, uint32(q.desc))
		d.Write32(RegQueueDescHigh, uint32(q.desc>>32))
		d.Write32(RegQueueDriverLow, uint32(q.avail))
		d.Write32(RegQueueDriverHigh, uint32(q.avail>>32))
		d.Write32(RegQueueDeviceLow, uint32(q.used))
		d.Write32(RegQueueDeviceHigh, uint32(q.used>>32))
		d.Write32(RegQueueReady, 1)
		d.Queues = append(d.Queues, q)
	}
	d.Write32(RegStatus, 1|2|8|4)
	if st := d.Read32(RegStatus); st&0x40 != 0 {
		return neg, fmt.Errorf("virtiotest: device needs reset right after DRIVER_OK (status %#x)", st)
	}
	return neg, nil
}

// Status reads the device status register.
func (d *Driver) Status() uint32 { return d.Read32(RegStatus) }

// Kick notifies queue q.
func (d *Driver) Kick(q int) { d.Write32(RegQueueNotify, uint32(q)) }

// Buf is one buffer of a chain to add: device-readable with contents Data,
// or device-writable (Write) with room for Len bytes.
type Buf struct {
	Data  []byte
	Len   uint32
	Write bool
}

// Used is a chain the device returned.
type Used struct {
	Head uint16
	Len  uint32
	// Written holds the device-writable buffers' contents, concatenated and
	// cut to Len.
	Written []byte
}

// Queue is the driver side of one split virtqueue.
type Queue struct {
	d                            *Driver
	Index                        int
	Size                         uint16
	desc, avail, used, slotsBase uint64
	slot                         uint32

	mu       sync.Mutex
	free     []uint16
	availIdx uint16
	lastUsed uint16
	inflight map[uint16][]Desc
}

// Desc is a descriptor the driver wrote.
type Desc struct {
	Addr  uint64
	Len   uint32
	Write bool
}

func (d *Driver) newQueue(i int, size uint16, slot uint32) (*Queue, error) {
	n := uint64(size)
	desc, err := d.Alloc(16*n, 16)
	if err != nil {
		return nil, err
	}
	avail, err := d.Alloc(6+2*n, 2)
	if err != nil {
		return nil, err
	}
	used, err := d.Alloc(6+8*n, 4)
	if err != nil {
		return nil, err
	}
	slots, err := d.Alloc(n*uint64(slot), 8)
	if err != nil {
		return nil, err
	}
	q := &Queue{d: d, Index: i, Size: size, desc: desc, avail: avail, used: used, slotsBase: slots, slot: slot,
		inflight: map[uint16][]Desc{}}
	for j := uint16(0); j < size; j++ {
		q.free = append(q.free, j)
	}
	return q, nil
}

// Addrs returns the ring addresses (for tests that corrupt them).
func (q *Queue) Addrs() (desc, avail, used uint64) { return q.desc, q.avail, q.used }

// ErrFull is returned by Add when the queue has too few free descriptors.
var ErrFull = errors.New("virtiotest: queue full")

func (q *Queue) put16(at uint64, v uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	q.d.Mem.WriteAt(b[:], int64(at))
}

func (q *Queue) get16(at uint64) uint16 {
	var b [2]byte
	q.d.Mem.ReadAt(b[:], int64(at))
	return binary.LittleEndian.Uint16(b[:])
}

// WriteDesc writes raw descriptor i of the table at table.
func (d *Driver) WriteDesc(table uint64, i uint16, addr uint64, n uint32, flags, next uint16) {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	d.Mem.WriteAt(b[:], int64(table+16*uint64(i)))
}

// Add places a chain made of bufs (readable first, then writable) in the
// queue, publishes it in the available ring and returns its head. It does
// not kick.
func (q *Queue) Add(bufs ...Buf) (uint16, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(bufs) == 0 || len(bufs) > len(q.free) {
		return 0, ErrFull
	}
	ids := q.free[:len(bufs)]
	var descs []Desc
	for k, b := range bufs {
		id := ids[k]
		n := b.Len
		if !b.Write {
			n = uint32(len(b.Data))
		}
		if n > q.slot {
			return 0, fmt.Errorf("virtiotest: buffer of %d bytes exceeds slot size %d", n, q.slot)
		}
		addr := q.slotsBase + uint64(id)*uint64(q.slot)
		if !b.Write {
			q.d.Mem.WriteAt(b.Data, int64(addr))
		}
		var flags, next uint16
		if b.Write {
			flags |= 2
		}
		if k+1 < len(bufs) {
			flags |= 1
			next = ids[k+1]
		}
		q.d.WriteDesc(q.desc, id, addr, n, flags, next)
		descs = append(descs, Desc{Addr: addr, Len: n, Write: b.Write})
	}
	head := ids[0]
	q.free = q.free[len(bufs):]
	q.inflight[head] = descs
	q.publish(head)
	return head, nil
}

// AddIndirect places the chain in an indirect table referenced by a single
// ring descriptor (needs VIRTIO_F_RING_INDIRECT_DESC).
func (q *Queue) AddIndirect(bufs ...Buf) (uint16, error) {
	table, err := q.d.Alloc(16*uint64(len(bufs)), 16)
	if err != nil {
		return 0, err
	}
	var descs []Desc
	for k, b := range bufs {
		n := b.Len
		if !b.Write {
			n = uint32(len(b.Data))
		}
		addr, err := q.d.Alloc(uint64(n), 8)
		if err != nil {
			return 0, err
		}
		if !b.Write {
			q.d.Mem.WriteAt(b.Data, int64(addr))
		}
		var flags, next uint16
		if b.Write {
			flags |= 2
		}
		if k+1 < len(bufs) {
			flags |= 1
			next = uint16(k + 1)
		}
		q.d.WriteDesc(table, uint16(k), addr, n, flags, next)
		descs = append(descs, Desc{Addr: addr, Len: n, Write: b.Write})
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.free) == 0 {
		return 0, ErrFull
	}
	head := q.free[0]
	q.free = q.free[1:]
	q.d.WriteDesc(q.desc, head, table, uint32(16*len(bufs)), 4, 0)
	q.inflight[head] = descs
	q.publish(head)
	return head, nil
}

// AddRawHead publishes head in the available ring without checking it (for
// tests that build hostile descriptor tables themselves).
func (q *Queue) AddRawHead(head uint16) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.publish(head)
}

func (q *Queue) publish(head uint16) {
	q.put16(q.avail+4+2*uint64(q.availIdx%q.Size), head)
	q.availIdx++
	q.put16(q.avail+2, q.availIdx)
}

// Poll returns the next used chain, if any.
func (q *Queue) Poll() (*Used, bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.get16(q.used+2) == q.lastUsed {
		return nil, false, nil
	}
	var e [8]byte
	q.d.Mem.ReadAt(e[:], int64(q.used+4+8*uint64(q.lastUsed%q.Size)))
	q.lastUsed++
	u := &Used{Head: uint16(binary.LittleEndian.Uint32(e[0:])), Len: binary.LittleEndian.Uint32(e[4:])}
	descs, ok := q.inflight[u.Head]
	if !ok {
		return nil, false, fmt.Errorf("virtiotest: queue %d: device returned head %d that is not in flight", q.Index, u.Head)
	}
	delete(q.inflight, u.Head)
	left := u.Len
	for _, d := range descs {
		if !d.Write || left == 0 {
			continue
		}
		n := min(left, d.Len)
		b := make([]byte, n)
		q.d.Mem.ReadAt(b, int64(d.Addr))
		u.Written = append(u.Written, b...)
		left -= n
	}
	if left != 0 {
		return nil, false, fmt.Errorf("virtiotest: queue %d: used length %d exceeds the chain's writable space", q.Index, u.Len)
	}
	// Return the chain's descriptors to the free list (indirect chains used
	// one ring descriptor, the head).
	if len(descs) > 0 && q.isIndirect(u.Head) {
		q.free = append(q.free, u.Head)
	} else {
		id := u.Head
		for range descs {
			q.free = append(q.free, id)
			var b [16]byte
			q.d.Mem.ReadAt(b[:], int64(q.desc+16*uint64(id)))
			id = binary.LittleEndian.Uint16(b[14:])
		}
	}
	return u, true, nil
}

func (q *Queue) isIndirect(head uint16) bool {
	var b [16]byte
	q.d.Mem.ReadAt(b[:], int64(q.desc+16*uint64(head)))
	return binary.LittleEndian.Uint16(b[12:])&4 != 0
}

// Wait returns the next used chain, sleeping on the interrupt between
// polls. It fails after timeout (DefaultTimeout if zero).
func (q *Queue) Wait(timeout time.Duration) (*Used, error) {
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		q.d.mu.Lock()
		wake := q.d.wake
		q.d.mu.Unlock()
		u, ok, err := q.Poll()
		if err != nil || ok {
			return u, err
		}
		select {
		case <-wake:
		case <-deadline.C:
			return nil, fmt.Errorf("virtiotest: queue %d: no used buffer within %v (status %#x)", q.Index, timeout, q.d.Status())
		}
	}
}

// WaitFor re-evaluates cond after every interrupt until it holds; it fails
// after timeout (DefaultTimeout if zero).
func (d *Driver) WaitFor(cond func() bool, timeout time.Duration) error {
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		// Take the wake channel before testing, so an interrupt handled in
		// between still wakes us.
		d.mu.Lock()
		wake := d.wake
		d.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-wake:
		case <-deadline.C:
			return fmt.Errorf("virtiotest: condition not met within %v (status %#x)", timeout, d.Status())
		}
	}
}
