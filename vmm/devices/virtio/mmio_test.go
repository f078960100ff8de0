package virtio

import (
	"errors"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/devices/internal/fakemem"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio/virtiotest"
)

// echoDev answers each chain by writing its readable bytes, reversed, into
// its writable buffers. It records lifecycle calls.
type echoDev struct {
	mu        sync.Mutex
	env       *Env
	w         *Worker
	resets    int
	activates int
	cfg       [8]byte
}

func (e *echoDev) Type() uint32            { return 0x42 }
func (e *echoDev) Features() uint64        { return 1 << 3 }
func (e *echoDev) QueueMaxSizes() []uint16 { return []uint16{8} }
func (e *echoDev) ReadConfig(off uint64, data []byte) {
	clear(data)
	if off < uint64(len(e.cfg)) {
		copy(data, e.cfg[off:])
	}
}
func (e *echoDev) WriteConfig(off uint64, data []byte) {
	if off < uint64(len(e.cfg)) {
		copy(e.cfg[off:], data)
	}
}

func (e *echoDev) Activate(env *Env) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.env = env
	e.activates++
	e.w = StartWorker(e.process)
	return nil
}

func (e *echoDev) process() {
	q := e.env.Queues[0]
	for {
		c, err := q.Pop()
		if err != nil {
			e.env.Fail(err)
			return
		}
		if c == nil {
			return
		}
		r := c.Reader(e.env.Mem)
		in := make([]byte, r.Remaining())
		if err := r.ReadFull(in); err != nil {
			e.env.Fail(err)
			return
		}
		slices.Reverse(in)
		w := c.Writer(e.env.Mem)
		if _, err := w.Write(in); err != nil && !errors.Is(err, ErrShortChain) {
			e.env.Fail(err)
			return
		}
		if err := q.PushUsed(c.Head, w.Written()); err != nil {
			e.env.Fail(err)
			return
		}
		q.Signal()
	}
}

func (e *echoDev) Notify(int) { e.w.Kick() }
func (e *echoDev) Reset() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.w.Stop()
	e.resets++
}
func (e *echoDev) Close() error { return nil }

func newEcho(t *testing.T) (*echoDev, *MMIO, *virtiotest.Driver) {
	t.Helper()
	mem := fakemem.New(1 << 20)
	irq := virtiotest.NewInterrupt()
	dev := &echoDev{}
	m := NewMMIO(dev, mem, irq, slog.New(slog.DiscardHandler))
	d := virtiotest.New(m, mem, irq)
	t.Cleanup(func() {
		d.Close()
		m.Close()
	})
	return dev, m, d
}

func TestRegisters(t *testing.T) {
	_, m, d := newEcho(t)
	tests := []struct {
		name string
		off  uint64
		want uint32
	}{
		{"magic", virtiotest.RegMagic, 0x74726976},
		{"version", virtiotest.RegVersion, 2},
		{"device id", virtiotest.RegDeviceID, 0x42},
		{"vendor", 0x00c, VendorID},
		{"queue num max of queue 0", virtiotest.RegQueueNumMax, 8},
		{"shm len (no regions)", 0x0b0, 0xffffffff},
	}
	for _, tt := range tests {
		if got := d.Read32(tt.off); got != tt.want {
			t.Errorf("%s: register %#x = %#x, want %#x", tt.name, tt.off, got, tt.want)
		}
	}
	d.Write32(virtiotest.RegDeviceFeatSel, 0)
	if got := d.Read32(virtiotest.RegDeviceFeatures); got != 1<<3|1<<28 {
		t.Errorf("features[0] = %#x, want device bit 3 and INDIRECT_DESC", got)
	}
	d.Write32(virtiotest.RegDeviceFeatSel, 1)
	if got := d.Read32(virtiotest.RegDeviceFeatures); got != 1 {
		t.Errorf("features[1] = %#x, want VERSION_1", got)
	}
	d.Write32(virtiotest.RegQueueSel, 5)
	if got := d.Read32(virtiotest.RegQueueNumMax); got != 0 {
		t.Errorf("QueueNumMax of a missing queue = %d, want 0", got)
	}
	// Narrow register reads are ignored and read as zero.
	b := []byte{0xff, 0xff}
	m.Read(virtiotest.RegMagic, b)
	if b[0] != 0 || b[1] != 0 {
		t.Errorf("2-byte read of magic = %x, want zeros", b)
	}
	// Config space accepts any width.
	m.Write(regConfig+2, []byte{0xab})
	b1 := make([]byte, 4)
	m.Read(regConfig, b1)
	if b1[2] != 0xab {
		t.Errorf("config byte 2 = %#x, want 0xab", b1[2])
	}
}

func TestFeatureNegotiation(t *testing.T) {
	tests := []struct {
		name   string
		accept uint64 // written to DriverFeatures
		ok     bool
	}{
		{"version 1 only", FeatureVersion1, true},
		{"all offered", FeatureVersion1 | FeatureRingIndirectDesc | 1<<3, true},
		{"legacy driver without VERSION_1", 1 << 3, false},
		{"unoffered feature", FeatureVersion1 | 1<<7, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, d := newEcho(t)
			d.Write32(virtiotest.RegStatus, 0)
			d.Write32(virtiotest.RegStatus, 3)
			d.Write32(virtiotest.RegDriverFeatSel, 0)
			d.Write32(virtiotest.RegDriverFeatures, uint32(tt.accept))
			d.Write32(virtiotest.RegDriverFeatSel, 1)
			d.Write32(virtiotest.RegDriverFeatures, uint32(tt.accept>>32))
			d.Write32(virtiotest.RegStatus, 3|8)
			if got := d.Status()&8 != 0; got != tt.ok {
				t.Errorf("FEATURES_OK accepted = %v, want %v", got, tt.ok)
			}
		})
	}
}

func TestEchoRoundTrip(t *testing.T) {
	tests := []struct {
		name     string
		indirect bool
		bufs     []virtiotest.Buf
		want     string
	}{
		{"one in one out", false, []virtiotest.Buf{{Data: []byte("hello")}, {Len: 5, Write: true}}, "olleh"},
		{"split buffers", false, []virtiotest.Buf{{Data: []byte("ab")}, {Data: []byte("cd")}, {Len: 1, Write: true}, {Len: 3, Write: true}}, "dcba"},
		{"short writable", false, []virtiotest.Buf{{Data: []byte("abcdef")}, {Len: 2, Write: true}}, "fe"},
		{"indirect", true, []virtiotest.Buf{{Data: []byte("xyz")}, {Len: 3, Write: true}}, "zyx"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev, _, d := newEcho(t)
			if _, err := d.Init(FeatureVersion1|FeatureRingIndirectDesc, []uint16{8}, 64); err != nil {
				t.Fatal(err)
			}
			q := d.Queues[0]
			add := q.Add
			if tt.indirect {
				add = q.AddIndirect
			}
			for i := 0; i < 20; i++ { // more than the queue size: descriptors are recycled
				head, err := add(tt.bufs...)
				if err != nil {
					t.Fatal(err)
				}
				d.Kick(0)
				u, err := q.Wait(0)
				if err != nil {
					t.Fatal(err)
				}
				if u.Head != head || string(u.Written) != tt.want {
					t.Fatalf("iteration %d: used head %d %q, want head %d %q", i, u.Head, u.Written, head, tt.want)
				}
			}
			if d.SeenInterrupts()&InterruptUsedBuffer == 0 {
				t.Error("driver saw no used-buffer interrupt")
			}
			if dev.activates != 1 {
				t.Errorf("device activated %d times, want 1", dev.activates)
			}
		})
	}
}

// TestHostileChains makes the driver lay out broken chains; the device must
// flag DEVICE_NEEDS_RESET and raise a config interrupt, not hang or panic.
func TestHostileChains(t *testing.T) {
	tests := []struct {
		name  string
		build func(d *virtiotest.Driver, q *virtiotest.Queue)
	}{
		{"self loop", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 0x8000, 4, 1, 0)
			q.AddRawHead(0)
		}},
		{"two-cycle", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 0x8000, 4, 1, 1)
			d.WriteDesc(desc, 1, 0x8000, 4, 1, 0)
			q.AddRawHead(0)
		}},
		{"next out of range", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 0x8000, 4, 1, 200)
			q.AddRawHead(0)
		}},
		{"head out of range", func(d *virtiotest.Driver, q *virtiotest.Queue) { q.AddRawHead(9) }},
		{"buffer outside RAM", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 1<<40, 4, 0, 0)
			q.AddRawHead(0)
		}},
		{"address overflow", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, ^uint64(0)-1, 16, 0, 0)
			q.AddRawHead(0)
		}},
		{"indirect loop", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 0x9000, 32, 4, 0)
			d.WriteDesc(0x9000, 0, 0x8000, 4, 1, 1)
			d.WriteDesc(0x9000, 1, 0x8000, 4, 1, 0)
			q.AddRawHead(0)
		}},
		{"nested indirect", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 0x9000, 16, 4, 0)
			d.WriteDesc(0x9000, 0, 0x9000, 16, 4, 0)
			q.AddRawHead(0)
		}},
		{"readable after writable", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			desc, _, _ := q.Addrs()
			d.WriteDesc(desc, 0, 0x8000, 4, 1|2, 1)
			d.WriteDesc(desc, 1, 0x8000, 4, 0, 0)
			q.AddRawHead(0)
		}},
		{"avail index far ahead", func(d *virtiotest.Driver, q *virtiotest.Queue) {
			_, avail, _ := q.Addrs()
			d.Mem.WriteAt([]byte{0x00, 0x10}, int64(avail+2))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, d := newEcho(t)
			if _, err := d.Init(FeatureVersion1|FeatureRingIndirectDesc, []uint16{8}, 64); err != nil {
				t.Fatal(err)
			}
			tt.build(d, d.Queues[0])
			d.Kick(0)
			err := d.WaitFor(func() bool {
				return d.Status()&StatusDeviceNeedsReset != 0 && d.SeenInterrupts()&InterruptConfigChange != 0
			}, 0)
			if err != nil {
				t.Fatalf("device did not flag NEEDS_RESET with a config-change interrupt: %v", err)
			}
			// A reset clears it and the device works again.
			if _, err := d.Init(FeatureVersion1, []uint16{8}, 64); err != nil {
				t.Fatal(err)
			}
			if d.Status()&StatusDeviceNeedsReset != 0 {
				t.Error("NEEDS_RESET survived a reset")
			}
		})
	}
}

func TestIndirectNotNegotiated(t *testing.T) {
	_, _, d := newEcho(t)
	if _, err := d.Init(FeatureVersion1, []uint16{8}, 64); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Queues[0].AddIndirect(virtiotest.Buf{Data: []byte("a")}); err != nil {
		t.Fatal(err)
	}
	d.Kick(0)
	if err := d.WaitFor(func() bool { return d.Status()&StatusDeviceNeedsReset != 0 }, 0); err != nil {
		t.Fatalf("indirect descriptor without the feature was accepted: %v", err)
	}
}

func TestBadQueueSetupFailsActivation(t *testing.T) {
	tests := []struct {
		name string
		num  uint32
		desc uint32
	}{
		{"size not power of two", 6, 0x1000},
		{"size above max", 16, 0x1000},
		{"misaligned descriptor table", 8, 0x1008},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev, _, d := newEcho(t)
			for _, s := range []uint32{0, 1, 3} {
				d.Write32(virtiotest.RegStatus, s)
			}
			d.Write32(virtiotest.RegDriverFeatSel, 1)
			d.Write32(virtiotest.RegDriverFeatures, 1)
			d.Write32(virtiotest.RegStatus, 3|8)
			d.Write32(virtiotest.RegQueueSel, 0)
			d.Write32(virtiotest.RegQueueNum, tt.num)
			d.Write32(virtiotest.RegQueueDescLow, tt.desc)
			d.Write32(virtiotest.RegQueueDriverLow, 0x2000)
			d.Write32(virtiotest.RegQueueDeviceLow, 0x3000)
			d.Write32(virtiotest.RegQueueReady, 1)
			d.Write32(virtiotest.RegStatus, 3|8|4)
			if d.Status()&StatusDeviceNeedsReset == 0 {
				t.Error("device accepted a bad queue without NEEDS_RESET")
			}
			if dev.activates != 0 {
				t.Error("device was activated with a bad queue")
			}
		})
	}
}

func TestResetStopsDevice(t *testing.T) {
	dev, _, d := newEcho(t)
	if _, err := d.Init(FeatureVersion1, []uint16{8}, 64); err != nil {
		t.Fatal(err)
	}
	d.Write32(virtiotest.RegStatus, 0)
	if dev.resets != 1 {
		t.Fatalf("device reset %d times, want 1", dev.resets)
	}
	if d.Status() != 0 {
		t.Errorf("status after reset = %#x, want 0", d.Status())
	}
	d.Write32(virtiotest.RegQueueSel, 0)
	if d.Read32(virtiotest.RegQueueReady) != 0 {
		t.Error("queue still ready after reset")
	}
	d.Kick(0) // must be ignored, not reach a stopped worker
}

func TestStateRestore(t *testing.T) {
	_, m, d := newEcho(t)
	if _, err := d.Init(FeatureVersion1, []uint16{8}, 64); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	for i := 0; i < 3; i++ {
		q.Add(virtiotest.Buf{Data: []byte("ab")}, virtiotest.Buf{Len: 2, Write: true})
		d.Kick(0)
		if _, err := q.Wait(0); err != nil {
			t.Fatal(err)
		}
	}
	s := m.State()
	if s.Queues[0].LastAvail != 3 || s.Queues[0].NextUsed != 3 || !s.Queues[0].Ready {
		t.Fatalf("queue state %+v, want ready with indices 3/3", s.Queues[0])
	}

	// Restore into a fresh transport over the same memory and continue.
	irq2 := virtiotest.NewInterrupt()
	dev2 := &echoDev{}
	m2 := NewMMIO(dev2, d.Mem, irq2, slog.New(slog.DiscardHandler))
	defer m2.Close()
	if err := m2.Restore(s); err != nil {
		t.Fatal(err)
	}
	if dev2.activates != 1 {
		t.Fatalf("restored device activated %d times, want 1", dev2.activates)
	}
	if got := m2.State(); !reflect.DeepEqual(got, s) {
		t.Errorf("state after restore = %+v, want %+v", got, s)
	}
	q.Add(virtiotest.Buf{Data: []byte("xy")}, virtiotest.Buf{Len: 2, Write: true})
	m2.NotifyQueue(0)
	for {
		u, ok, err := q.Poll()
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			if string(u.Written) != "yx" {
				t.Errorf("after restore got %q, want %q", u.Written, "yx")
			}
			break
		}
		<-irq2.C()
		// Act as m2's interrupt handler: acknowledge, then poll again.
		st := make([]byte, 4)
		m2.Read(virtiotest.RegInterruptStatus, st)
		m2.Write(virtiotest.RegInterruptACK, st)
	}

	bad := s
	bad.Version = 99
	if err := m2.Restore(bad); err == nil || !strings.Contains(err.Error(), "version") {
		t.Errorf("restore of version 99 = %v, want a version error", err)
	}
}

func TestKernelCmdline(t *testing.T) {
	tests := []struct {
		i    int
		want string
	}{
		{0, "virtio_mmio.device=4K@0xd0000000:5"},
		{1, "virtio_mmio.device=4K@0xd0001000:6"},
		{4, "virtio_mmio.device=4K@0xd0004000:10"}, // GSI 9 is the SCI
	}
	for _, tt := range tests {
		if got := KernelCmdline(tt.i); got != tt.want {
			t.Errorf("KernelCmdline(%d) = %q, want %q", tt.i, got, tt.want)
		}
	}
}
