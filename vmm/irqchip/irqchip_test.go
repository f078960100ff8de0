package irqchip

import (
	"encoding/binary"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock fires timers only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c       *fakeClock
	at      time.Time
	f       func()
	stopped bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := !t.stopped
	t.stopped = true
	return was
}

// Advance moves time forward by d, firing due timers in order (each at
// its own time, so periodic re-arms are seen).
func (c *fakeClock) Advance(d time.Duration) {
	end := c.Now().Add(d)
	for {
		c.mu.Lock()
		sort.Slice(c.timers, func(i, j int) bool { return c.timers[i].at.Before(c.timers[j].at) })
		var next *fakeTimer
		for i, t := range c.timers {
			if !t.stopped && !t.at.After(end) {
				next = t
				c.timers = append(c.timers[:i], c.timers[i+1:]...)
				break
			}
		}
		if next == nil {
			c.now = end
			c.mu.Unlock()
			return
		}
		if next.at.After(c.now) {
			c.now = next.at
		}
		next.stopped = true
		c.mu.Unlock()
		next.f()
	}
}

func w32(l interface{ Write(uint64, []byte) }, off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	l.Write(off, b[:])
}

func r32(l interface{ Read(uint64, []byte) }, off uint64) uint32 {
	var b [4]byte
	l.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

func TestTargets(t *testing.T) {
	views := []View{
		{ID: 0, LDR: 0x01, DFR: flatModel},
		{ID: 1, LDR: 0x02, DFR: flatModel},
		{ID: 2, LDR: 0x04, DFR: flatModel},
		{ID: 7, LDR: 0x08, DFR: flatModel},
	}
	cluster := []View{
		{ID: 0, LDR: 0x11, DFR: clusterModel},
		{ID: 1, LDR: 0x12, DFR: clusterModel},
		{ID: 2, LDR: 0x21, DFR: clusterModel},
	}
	tests := []struct {
		name  string
		m     Message
		views []View
		want  []int
	}{
		{"physical", Message{Dest: 2}, views, []int{2}},
		{"physical by APIC ID", Message{Dest: 7}, views, []int{3}},
		{"physical none", Message{Dest: 5}, views, nil},
		{"physical broadcast", Message{Dest: 0xFF}, views, []int{0, 1, 2, 3}},
		{"logical flat", Message{Logical: true, Dest: 0x05}, views, []int{0, 2}},
		{"logical cluster", Message{Logical: true, Dest: 0x13}, cluster, []int{0, 1}},
		{"logical cluster other", Message{Logical: true, Dest: 0x21}, cluster, []int{2}},
		{"self", Message{Shorthand: Self, Source: 1, Dest: 3}, views, []int{1}},
		{"all", Message{Shorthand: AllInclSelf, Source: 1}, views, []int{0, 1, 2, 3}},
		{"all but self", Message{Shorthand: AllExclSelf, Source: 1}, views, []int{0, 2, 3}},
		{"lowest priority picks one", Message{Mode: LowestPriority, Logical: true, Dest: 0x06}, views, []int{1}},
		{"NMI to several", Message{Mode: NMI, Logical: true, Dest: 0x06}, views, []int{1, 2}},
	}
	for _, tt := range tests {
		if got := Targets(tt.m, tt.views); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: Targets = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestMSIMessage(t *testing.T) {
	m := MSIMessage(0xFEE00000|3<<12|1<<2, 0x4000|uint32(LowestPriority)<<8|0x41)
	want := Message{Vector: 0x41, Mode: LowestPriority, Logical: true, Dest: 3, Assert: true, Source: -1}
	if m != want {
		t.Fatalf("MSIMessage = %+v, want %+v", m, want)
	}
}

type lapicRig struct {
	l       *LAPIC
	clock   *fakeClock
	mu      sync.Mutex
	notify  int
	sent    []Message
	eois    []uint8
	changed []View
}

func newRig(t *testing.T) *lapicRig {
	r := &lapicRig{clock: newFakeClock()}
	r.l = NewLAPIC(LAPICConfig{ID: 3, Clock: r.clock, TSCHz: 1_000_000_000,
		Notify:  func() { r.mu.Lock(); r.notify++; r.mu.Unlock() },
		Send:    func(m Message) { r.mu.Lock(); r.sent = append(r.sent, m); r.mu.Unlock() },
		EOI:     func(v uint8) { r.mu.Lock(); r.eois = append(r.eois, v); r.mu.Unlock() },
		Changed: func(v View) { r.mu.Lock(); r.changed = append(r.changed, v); r.mu.Unlock() },
	})
	t.Cleanup(r.l.Close)
	return r
}

func (r *lapicRig) enable() { w32(r.l, RegSVR, 0x1FF) }

func TestLAPICResetState(t *testing.T) {
	r := newRig(t)
	for _, c := range []struct {
		reg  uint64
		want uint32
	}{
		{RegID, 3 << 24}, {RegVersion, 0x00050014}, {RegSVR, 0xFF}, {RegDFR, 0xFFFFFFFF}, {RegLDR, 0},
		{RegLVTTimer, lvtMasked}, {RegLVTLINT0, lvtMasked}, {RegLVTLINT1, lvtMasked}, {RegLVTError, lvtMasked},
		{RegTPR, 0}, {RegPPR, 0}, {RegTimerCount, 0},
	} {
		if got := r32(r.l, c.reg); got != c.want {
			t.Errorf("register %#x = %#x after reset, want %#x", c.reg, got, c.want)
		}
	}
	// A byte read of the ID register's top byte.
	var b [1]byte
	r.l.Read(RegID+3, b[:])
	if b[0] != 3 {
		t.Errorf("byte read of APIC ID = %d, want 3", b[0])
	}
}

func TestLAPICAcceptPriorityEOI(t *testing.T) {
	r := newRig(t)
	r.l.Accept(Message{Vector: 0x40})
	if _, ok := r.l.PendingInterrupt(); ok || r.notify != 0 {
		t.Fatal("a software-disabled APIC accepted a fixed interrupt")
	}
	r.l.Accept(Message{Mode: NMI})
	if !r.l.TakeNMI() || r.l.TakeNMI() {
		t.Fatal("NMI not accepted exactly once while disabled")
	}
	r.enable()
	r.l.Accept(Message{Vector: 0x41})
	r.l.Accept(Message{Vector: 0x62, Level: true, Assert: true})
	r.l.Accept(Message{Vector: 0x45})
	if v, ok := r.l.PendingInterrupt(); !ok || v != 0x62 {
		t.Fatalf("pending = %#x %v, want 0x62", v, ok)
	}
	if got := r32(r.l, RegIRR+0x10*(0x62/32)); got&(1<<(0x62%32)) == 0 {
		t.Fatalf("IRR lacks 0x62: %#x", got)
	}
	if got := r32(r.l, RegTMR+0x10*(0x62/32)); got&(1<<(0x62%32)) == 0 {
		t.Fatalf("TMR lacks level vector 0x62: %#x", got)
	}
	r.l.AckInterrupt(0x62)
	// In service at class 6: class-4 vectors wait.
	if _, ok := r.l.PendingInterrupt(); ok {
		t.Fatal("lower-class vector deliverable while 0x62 in service")
	}
	if ppr := r32(r.l, RegPPR); ppr != 0x60 {
		t.Fatalf("PPR = %#x, want 0x60", ppr)
	}
	w32(r.l, RegEOI, 0)
	if !reflect.DeepEqual(r.eois, []uint8{0x62}) {
		t.Fatalf("EOI broadcasts %v, want [0x62]", r.eois)
	}
	if v, ok := r.l.PendingInterrupt(); !ok || v != 0x45 {
		t.Fatalf("pending after EOI = %#x %v, want 0x45", v, ok)
	}
	// TPR at class 4 holds 0x45 and 0x41 back.
	w32(r.l, RegTPR, 0x40)
	if _, ok := r.l.PendingInterrupt(); ok || r.l.HasWork(true) {
		t.Fatal("vector 0x45 deliverable with TPR 0x40")
	}
	r.l.SetTPR(0)
	r.l.AckInterrupt(0x45)
	w32(r.l, RegEOI, 0)
	if len(r.eois) != 1 {
		t.Fatalf("edge EOI broadcast: %v", r.eois)
	}
	if !r.l.HasWork(true) || r.l.HasWork(false) {
		t.Fatal("HasWork must follow IF for a pending fixed interrupt")
	}
	// Illegal vector.
	r.l.Accept(Message{Vector: 3})
	if esr := r32(r.l, RegESR); esr&esrIllegalVec == 0 {
		t.Fatalf("ESR = %#x after an illegal vector", esr)
	}
	if acc, inj := r.l.Accepted(); acc != 3 || inj != 2 {
		t.Fatalf("accepted %d injected %d, want 3 and 2", acc, inj)
	}
}

func TestLAPICICRAndIDs(t *testing.T) {
	r := newRig(t)
	r.enable()
	w32(r.l, RegICRHigh, 5<<24)
	w32(r.l, RegICRLow, 0x4000|uint32(Fixed)<<8|0x50)
	w32(r.l, RegICRLow, uint32(INIT)<<8|1<<14|1<<15|1<<11) // INIT assert, level, logical
	w32(r.l, RegICRLow, uint32(StartUp)<<8|0x9A|AllExclSelf<<18)
	w32(r.l, RegICRLow, uint32(Fixed)<<8|0x05) // illegal vector: not sent
	want := []Message{
		{Vector: 0x50, Mode: Fixed, Dest: 5, Assert: true, Source: 3},
		{Mode: INIT, Logical: true, Dest: 5, Level: true, Assert: true, Source: 3},
		{Vector: 0x9A, Mode: StartUp, Dest: 5, Shorthand: AllExclSelf, Source: 3},
	}
	if !reflect.DeepEqual(r.sent, want) {
		t.Fatalf("sent %+v\nwant %+v", r.sent, want)
	}
	if esr := r32(r.l, RegESR); esr&esrSendIllVec == 0 {
		t.Fatalf("ESR = %#x after sending an illegal vector", esr)
	}
	if r32(r.l, RegICRLow)&icrPending != 0 {
		t.Fatal("ICR delivery status stays pending")
	}
	w32(r.l, RegLDR, 0x08<<24|0xABC)
	w32(r.l, RegDFR, 0x0FFFFFFF)
	w32(r.l, RegID, 9<<24)
	if r32(r.l, RegLDR) != 0x08<<24 || r32(r.l, RegDFR) != 0x0FFFFFFF {
		t.Fatalf("LDR %#x DFR %#x", r32(r.l, RegLDR), r32(r.l, RegDFR))
	}
	wantViews := []View{{ID: 3, LDR: 8, DFR: 0xF}, {ID: 3, LDR: 8, DFR: 0}, {ID: 9, LDR: 8, DFR: 0}}
	if !reflect.DeepEqual(r.changed, wantViews) {
		t.Fatalf("views %+v, want %+v", r.changed, wantViews)
	}
	// INIT, SIPI; an INIT level de-assert is ignored.
	r.l.Accept(Message{Mode: INIT, Level: true})
	if r.l.TakeINIT() {
		t.Fatal("INIT de-assert taken as INIT")
	}
	r.l.Accept(Message{Mode: StartUp, Vector: 0x11}) // discarded by the INIT after it
	r.l.Accept(Message{Mode: INIT, Assert: true})
	r.l.Accept(Message{Mode: StartUp, Vector: 0x9A})
	if !r.l.TakeINIT() {
		t.Fatal("INIT lost")
	}
	r.l.Reset() // applying the INIT keeps the SIPI that followed it
	if v, ok := r.l.TakeSIPI(); !ok || v != 0x9A {
		t.Fatalf("SIPI = %#x %v", v, ok)
	}
	if r32(r.l, RegSVR) != 0xFF || r32(r.l, RegID) != 9<<24 || r32(r.l, RegLDR) != 0 {
		t.Fatal("INIT reset must clear SVR and LDR and keep the APIC ID")
	}
}

func TestLAPICDisableMasksLVT(t *testing.T) {
	r := newRig(t)
	r.enable()
	w32(r.l, RegLVTLINT1, uint32(NMI)<<8)
	if r32(r.l, RegLVTLINT1) != uint32(NMI)<<8 {
		t.Fatalf("LVT LINT1 = %#x", r32(r.l, RegLVTLINT1))
	}
	r.l.LINT(1)
	if !r.l.TakeNMI() {
		t.Fatal("LINT1 as NMI not delivered")
	}
	w32(r.l, RegSVR, 0xFF)
	if r32(r.l, RegLVTLINT1)&lvtMasked == 0 {
		t.Fatal("disabling the APIC must mask every LVT")
	}
	w32(r.l, RegLVTLINT1, uint32(NMI)<<8)
	if r32(r.l, RegLVTLINT1)&lvtMasked == 0 {
		t.Fatal("an LVT can be unmasked while the APIC is disabled")
	}
	r.l.LINT(1)
	if r.l.TakeNMI() {
		t.Fatal("masked LINT1 delivered")
	}
}

func TestLAPICTimerOneShotAndPeriodic(t *testing.T) {
	r := newRig(t)
	r.enable()
	w32(r.l, RegTimerDiv, 0xB) // divide by 1: one count per ns
	w32(r.l, RegLVTTimer, 0xEC)
	w32(r.l, RegTimerInit, 1000)
	r.clock.Advance(400 * time.Nanosecond)
	if c := r32(r.l, RegTimerCount); c != 600 {
		t.Fatalf("current count %d after 400 ns, want 600", c)
	}
	if _, ok := r.l.PendingInterrupt(); ok {
		t.Fatal("timer fired early")
	}
	r.clock.Advance(600 * time.Nanosecond)
	if v, ok := r.l.PendingInterrupt(); !ok || v != 0xEC {
		t.Fatalf("one-shot timer: pending %#x %v", v, ok)
	}
	if c := r32(r.l, RegTimerCount); c != 0 {
		t.Fatalf("current count %d after expiry", c)
	}
	r.l.AckInterrupt(0xEC)
	w32(r.l, RegEOI, 0)
	r.clock.Advance(10 * time.Microsecond)
	if acc, _ := r.l.Accepted(); acc != 1 {
		t.Fatalf("one-shot fired %d times", acc)
	}
	// Periodic, divide by 16: 100 counts = 1600 ns.
	w32(r.l, RegLVTTimer, 0xED|timerPeriodic)
	w32(r.l, RegTimerDiv, 0x3)
	w32(r.l, RegTimerInit, 100)
	r.clock.Advance(1600*time.Nanosecond*5 + 800*time.Nanosecond)
	if acc, _ := r.l.Accepted(); acc != 1+5 {
		t.Fatalf("periodic timer fired %d times in 5.5 periods, want 5", acc-1)
	}
	if c := r32(r.l, RegTimerCount); c != 50 {
		t.Fatalf("periodic current count %d mid-period, want 50", c)
	}
	// Masking stops delivery but the timer keeps counting.
	w32(r.l, RegLVTTimer, 0xED|timerPeriodic|lvtMasked)
	r.clock.Advance(1600 * time.Nanosecond * 3)
	if acc, _ := r.l.Accepted(); acc != 6 {
		t.Fatalf("masked periodic timer delivered: %d", acc)
	}
	// Writing 0 stops it.
	w32(r.l, RegLVTTimer, 0xED|timerPeriodic)
	w32(r.l, RegTimerInit, 0)
	r.clock.Advance(time.Millisecond)
	if acc, _ := r.l.Accepted(); acc != 6 {
		t.Fatalf("stopped timer delivered: %d", acc)
	}
}

func TestLAPICTimerTSCDeadline(t *testing.T) {
	r := newRig(t)
	r.enable()
	r.l.SetTSCDeadline(5000, 0) // not in deadline mode: ignored
	if r.l.TSCDeadline() != 0 {
		t.Fatal("deadline armed outside TSC-deadline mode")
	}
	w32(r.l, RegLVTTimer, 0xEE|timerDeadline)
	w32(r.l, RegTimerInit, 10)                    // ignored in deadline mode
	r.l.SetTSCDeadline(1_000_000+5000, 1_000_000) // 5000 cycles at 1 GHz = 5 us
	if r.l.TSCDeadline() != 1_005_000 {
		t.Fatalf("deadline reads %d", r.l.TSCDeadline())
	}
	r.clock.Advance(4 * time.Microsecond)
	if _, ok := r.l.PendingInterrupt(); ok {
		t.Fatal("deadline timer fired early")
	}
	r.clock.Advance(time.Microsecond)
	if v, ok := r.l.PendingInterrupt(); !ok || v != 0xEE || r.l.TSCDeadline() != 0 {
		t.Fatalf("deadline timer: pending %#x %v, deadline now %d", v, ok, r.l.TSCDeadline())
	}
	// A deadline in the past fires at once; 0 disarms; a mode change disarms.
	r.l.AckInterrupt(0xEE)
	w32(r.l, RegEOI, 0)
	r.l.SetTSCDeadline(10, 20)
	r.clock.Advance(0)
	if acc, _ := r.l.Accepted(); acc != 2 {
		t.Fatalf("past deadline: accepted %d, want 2", acc)
	}
	r.l.SetTSCDeadline(1<<40, 0)
	w32(r.l, RegLVTTimer, 0xEE)
	if r.l.TSCDeadline() != 0 {
		t.Fatal("mode change left the deadline armed")
	}
	r.clock.Advance(2000 * time.Second)
	if acc, _ := r.l.Accepted(); acc != 2 {
		t.Fatalf("disarmed deadline fired: %d", acc)
	}
}

// TestLAPICTimerSlack: with TimerSlack a TSC-deadline expiry moves to
// the next multiple of the slack on the clock, never earlier than asked.
func TestLAPICTimerSlack(t *testing.T) {
	r := &lapicRig{clock: newFakeClock()} // the clock starts on a whole second
	r.l = NewLAPIC(LAPICConfig{ID: 0, Clock: r.clock, TSCHz: 1_000_000_000, TimerSlack: 10 * time.Millisecond,
		Notify: func() {}, Send: func(Message) {}, EOI: func(uint8) {}, Changed: func(View) {}})
	t.Cleanup(r.l.Close)
	r.enable()
	w32(r.l, RegLVTTimer, 0xEE|timerDeadline)
	r.clock.Advance(3 * time.Millisecond)
	fired := func() bool {
		_, ok := r.l.PendingInterrupt()
		if ok {
			r.l.AckInterrupt(0xEE)
			w32(r.l, RegEOI, 0)
		}
		return ok
	}
	for _, c := range []struct {
		ahead, early, late time.Duration // deadline from now; no expiry after early, one after late
	}{
		{time.Millisecond, 6*time.Millisecond + 999*time.Microsecond, 7 * time.Millisecond},        // 4 ms -> 10 ms
		{15 * time.Millisecond, 19*time.Millisecond + 999*time.Microsecond, 20 * time.Millisecond}, // at 10 ms: 25 ms -> 30 ms
		{10 * time.Millisecond, 9*time.Millisecond + 999*time.Microsecond, 10 * time.Millisecond},  // at 30 ms: on the grid, as asked
	} {
		now := uint64(r.clock.Now().UnixNano())
		r.l.SetTSCDeadline(now+uint64(c.ahead), now)
		r.clock.Advance(c.early)
		if fired() {
			t.Fatalf("deadline %v ahead fired before %v", c.ahead, c.early)
		}
		r.clock.Advance(c.late - c.early)
		if !fired() {
			t.Fatalf("deadline %v ahead had not fired after %v", c.ahead, c.late)
		}
	}
}

func TestIOAPIC(t *testing.T) {
	var mu sync.Mutex
	var got []Message
	a := NewIOAPIC(func(m Message) { mu.Lock(); got = append(got, m); mu.Unlock() })
	take := func() []Message {
		mu.Lock()
		defer mu.Unlock()
		g := got
		got = nil
		return g
	}
	set := func(pin int, lo, hi uint32) {
		w32(a, IOAPICRegSel, uint32(ioapicRedTbl+2*pin+1))
		w32(a, IOAPICWin, hi)
		w32(a, IOAPICRegSel, uint32(ioapicRedTbl+2*pin))
		w32(a, IOAPICWin, lo)
	}
	w32(a, IOAPICRegSel, ioapicVersion)
	if v := r32(a, IOAPICWin); v != 0x170020 {
		t.Fatalf("version %#x", v)
	}
	// Edge, masked: lost.
	a.Pulse(3)
	if len(take()) != 0 {
		t.Fatal("masked pin delivered")
	}
	set(3, 0x33, 2<<24)
	w32(a, IOAPICRegSel, ioapicRedTbl+2*3)
	if v := r32(a, IOAPICWin); v != 0x33 {
		t.Fatalf("redirection low reads %#x", v)
	}
	if err := a.Line(3).Trigger(); err != nil {
		t.Fatal(err)
	}
	if m := take(); len(m) != 1 || m[0] != (Message{Vector: 0x33, Dest: 2, Assert: true, Source: -1}) {
		t.Fatalf("edge delivery %+v", m)
	}
	// Level, logical: delivered once until EOI, again while asserted.
	set(5, 0x55|redLevel|redLogical|uint32(LowestPriority)<<8, 0x0F<<24)
	a.SetLevel(5, true)
	a.SetLevel(5, true)
	if m := take(); len(m) != 1 || !m[0].Level || !m[0].Logical || m[0].Mode != LowestPriority {
		t.Fatalf("level delivery %+v", m)
	}
	w32(a, IOAPICRegSel, ioapicRedTbl+2*5)
	if r32(a, IOAPICWin)&redRemote == 0 {
		t.Fatal("remote IRR not set")
	}
	a.EOI(0x55)
	if m := take(); len(m) != 1 {
		t.Fatalf("still asserted after EOI: %d deliveries, want 1", len(m))
	}
	a.SetLevel(5, false)
	w32(a, IOAPICEOI, 0x55) // EOI through the register
	if m := take(); len(m) != 0 {
		t.Fatalf("released line delivered after EOI: %+v", m)
	}
	// Unmasking an asserted level entry delivers it.
	set(6, 0x66|redLevel|redMasked, 0)
	a.SetLevel(6, true)
	if len(take()) != 0 {
		t.Fatal("masked level pin delivered")
	}
	set(6, 0x66|redLevel, 0)
	if m := take(); len(m) != 1 || m[0].Vector != 0x66 {
		t.Fatalf("unmask delivery %+v", m)
	}
	if a.Delivered(5) != 2 || a.Delivered(6) != 1 {
		t.Fatalf("delivered counts %d %d", a.Delivered(5), a.Delivered(6))
	}
	if err := a.SetLevel(24, true); err == nil {
		t.Fatal("pin 24 accepted")
	}
}

func TestLAPICDescribeNamesPendingAndInService(t *testing.T) {
	l := NewLAPIC(LAPICConfig{ID: 1})
	w32(l, RegSVR, 0x1FF)
	l.Accept(Message{Vector: 0x31, Mode: Fixed})
	l.Accept(Message{Vector: 0x40, Mode: Fixed})
	l.AckInterrupt(0x40)
	d := l.Describe()
	for _, want := range []string{"enabled=true", "isr=64", "irr=49", "timer-armed=no"} {
		if !strings.Contains(d, want) {
			t.Errorf("Describe() = %q, lacks %q", d, want)
		}
	}
}
