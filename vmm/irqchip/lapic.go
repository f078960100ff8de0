package irqchip

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync"
	"time"
)

// Local APIC register offsets in the 4 KiB MMIO page (xAPIC).
const (
	RegID         = 0x020
	RegVersion    = 0x030
	RegTPR        = 0x080
	RegAPR        = 0x090
	RegPPR        = 0x0A0
	RegEOI        = 0x0B0
	RegRRD        = 0x0C0
	RegLDR        = 0x0D0
	RegDFR        = 0x0E0
	RegSVR        = 0x0F0
	RegISR        = 0x100 // 8 registers, 0x10 apart
	RegTMR        = 0x180
	RegIRR        = 0x200
	RegESR        = 0x280
	RegLVTCMCI    = 0x2F0
	RegICRLow     = 0x300
	RegICRHigh    = 0x310
	RegLVTTimer   = 0x320
	RegLVTThermal = 0x330
	RegLVTPerf    = 0x340
	RegLVTLINT0   = 0x350
	RegLVTLINT1   = 0x360
	RegLVTError   = 0x370
	RegTimerInit  = 0x380
	RegTimerCount = 0x390
	RegTimerDiv   = 0x3E0
)

// Register bits.
const (
	svrEnable     = 1 << 8
	lvtMasked     = 1 << 16
	lvtTimerMode  = 3 << 17
	timerOneShot  = 0 << 17
	timerPeriodic = 1 << 17
	timerDeadline = 2 << 17
	esrIllegalVec = 1 << 6 // received illegal vector
	esrSendIllVec = 1 << 5 // send illegal vector
	esrIllegalReg = 1 << 7
	icrPending    = 1 << 12
	lapicVersion  = 0x00050014 // version 0x14, max LVT entry 5 (6 LVTs), no EOI-broadcast suppression
)

// TimerHz is the frequency the APIC timer counts at before its divider
// (the "bus clock"; 1 GHz makes one count one nanosecond).
const TimerHz = 1_000_000_000

// LVT indexes.
const (
	lvtTimer = iota
	lvtThermal
	lvtPerf
	lvtLINT0
	lvtLINT1
	lvtError
	lvtCMCI
	numLVT
)

var lvtOffsets = [numLVT]uint64{RegLVTTimer, RegLVTThermal, RegLVTPerf, RegLVTLINT0, RegLVTLINT1, RegLVTError, RegLVTCMCI}

// LAPICConfig wires a local APIC to its vCPU and the rest of the VM. The
// callbacks are made without the LAPIC's lock held, from whatever
// goroutine caused them (a vCPU thread, a timer, a network reader).
type LAPICConfig struct {
	ID    int   // vCPU index and initial APIC ID
	Clock Clock // default HostClock
	// Notify: the vCPU has something to take (an interrupt, NMI, INIT or
	// SIPI): kick it out of the guest / wake it from HLT.
	Notify func()
	// Send delivers an IPI the guest wrote to the ICR (Source = ID).
	Send func(Message)
	// EOI tells the IOAPIC(s) a level-triggered vector was EOIed.
	EOI func(vector uint8)
	// Changed: the APIC ID, LDR or DFR changed (destination resolution).
	Changed func(View)
	// TSCHz is the guest TSC frequency (TSC-deadline timer mode).
	TSCHz uint64
	// TimerSlack, if set, delays each TSC-deadline expiry to the next
	// multiple of it on the clock (timers coalesce on a grid, as Linux's
	// timer slack does for user timers): a guest whose tick reaches for
	// pages on other nodes then ticks at most 1/TimerSlack times a second
	// on this vCPU. Linux counts the time of late ticks in full.
	TimerSlack time.Duration
}

// LAPIC is one vCPU's local APIC. All methods are safe for concurrent use.
type LAPIC struct {
	cfg LAPICConfig

	mu        sync.Mutex
	id        uint32 // ID register (APIC ID in bits 31:24)
	tpr       uint32
	ldr, dfr  uint32
	svr       uint32
	irr, isr  [8]uint32
	tmr       [8]uint32
	esr       uint32
	icrLo     uint32
	icrHi     uint32
	lvt       [numLVT]uint32
	timerInit uint32
	timerDiv  uint32

	// Timer: armed at start with period (one-shot and periodic); gen
	// invalidates callbacks of timers stopped since.
	timer    Timer
	gen      uint64
	start    time.Time
	period   time.Duration
	deadline uint64 // TSC-deadline register

	nmi, init bool
	sipi      bool
	sipiVec   uint8

	// Statistics for tests and debugging.
	accepted, injected int
}

// NewLAPIC returns a local APIC in its reset state.
func NewLAPIC(cfg LAPICConfig) *LAPIC {
	if cfg.Clock == nil {
		cfg.Clock = HostClock{}
	}
	if cfg.Notify == nil {
		cfg.Notify = func() {}
	}
	if cfg.Send == nil {
		cfg.Send = func(Message) {}
	}
	if cfg.EOI == nil {
		cfg.EOI = func(uint8) {}
	}
	if cfg.Changed == nil {
		cfg.Changed = func(View) {}
	}
	l := &LAPIC{cfg: cfg}
	l.id = uint32(cfg.ID) << 24
	l.resetLocked()
	return l
}

// resetLocked puts every register but the APIC ID in its power-up/INIT
// state (SDM 10.4.7.3).
func (l *LAPIC) resetLocked() {
	l.stopTimerLocked()
	l.tpr, l.ldr, l.dfr, l.svr = 0, 0, 0xFFFFFFFF, 0xFF
	l.irr, l.isr, l.tmr = [8]uint32{}, [8]uint32{}, [8]uint32{}
	l.esr, l.icrLo, l.icrHi = 0, 0, 0
	for i := range l.lvt {
		l.lvt[i] = lvtMasked
	}
	l.timerInit, l.timerDiv, l.deadline = 0, 0, 0
	// A pending SIPI survives: it arrived after the INIT being applied
	// (an INIT discards SIPIs that came before it, in Accept).
	l.nmi = false
}

// Reset applies an INIT to the local APIC (the APIC ID is kept).
func (l *LAPIC) Reset() {
	l.mu.Lock()
	l.resetLocked()
	v := l.viewLocked()
	l.mu.Unlock()
	l.cfg.Changed(v)
}

// Close stops the timer.
func (l *LAPIC) Close() {
	l.mu.Lock()
	l.stopTimerLocked()
	l.mu.Unlock()
}

func (l *LAPIC) viewLocked() View {
	return View{ID: uint8(l.id >> 24), LDR: uint8(l.ldr >> 24), DFR: uint8(l.dfr >> 28)}
}

// View returns the destination-matching state.
func (l *LAPIC) View() View {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.viewLocked()
}

func (l *LAPIC) enabledLocked() bool { return l.svr&svrEnable != 0 }

func setBit(r *[8]uint32, v uint8)       { r[v/32] |= 1 << (v % 32) }
func clearBit(r *[8]uint32, v uint8)     { r[v/32] &^= 1 << (v % 32) }
func testBit(r *[8]uint32, v uint8) bool { return r[v/32]&(1<<(v%32)) != 0 }

// highest returns the highest set vector, or -1.
func highest(r *[8]uint32) int {
	for i := 7; i >= 0; i-- {
		if r[i] != 0 {
			return i*32 + 31 - bits.LeadingZeros32(r[i])
		}
	}
	return -1
}

func (l *LAPIC) pprLocked() uint32 {
	isrv := uint32(0)
	if h := highest(&l.isr); h >= 0 {
		isrv = uint32(h)
	}
	if l.tpr>>4 >= isrv>>4 {
		return l.tpr & 0xFF
	}
	return isrv & 0xF0
}

// pendingLocked is the highest IRR vector whose priority class is above
// the processor priority.
func (l *LAPIC) pendingLocked() (uint8, bool) {
	if !l.enabledLocked() {
		return 0, false
	}
	h := highest(&l.irr)
	if h < 0 || uint32(h)>>4 <= l.pprLocked()>>4 {
		return 0, false
	}
	return uint8(h), true
}

// PendingInterrupt returns the vector the vCPU should take next, if any.
func (l *LAPIC) PendingInterrupt() (uint8, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pendingLocked()
}

// AckInterrupt records that vector was injected into the vCPU: it moves
// from the IRR to the ISR (the vCPU is now servicing it until EOI).
func (l *LAPIC) AckInterrupt(vector uint8) {
	l.mu.Lock()
	clearBit(&l.irr, vector)
	setBit(&l.isr, vector)
	l.injected++
	l.mu.Unlock()
}

// TakeNMI reports and clears a pending NMI.
func (l *LAPIC) TakeNMI() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.nmi
	l.nmi = false
	return n
}

// TakeINIT reports and clears a pending INIT.
func (l *LAPIC) TakeINIT() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.init
	l.init = false
	return n
}

// TakeSIPI reports and clears a pending startup IPI and its vector. The
// vCPU acts on it only while it waits for one (after INIT).
func (l *LAPIC) TakeSIPI() (uint8, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	v, ok := l.sipiVec, l.sipi
	l.sipi = false
	return v, ok
}

// HasWork reports whether a halted vCPU must wake: an interrupt it can
// take (if interruptsEnabled, i.e. RFLAGS.IF), an NMI or an INIT. (A SIPI
// only matters to a vCPU waiting for one, which is not halted.)
func (l *LAPIC) HasWork(interruptsEnabled bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.nmi || l.init {
		return true
	}
	_, ok := l.pendingLocked()
	return ok && interruptsEnabled
}

// TPR returns the task priority register (CR8 is TPR[7:4]).
func (l *LAPIC) TPR() uint8 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return uint8(l.tpr)
}

// SetTPR sets the task priority (the guest wrote CR8).
func (l *LAPIC) SetTPR(v uint8) {
	l.mu.Lock()
	l.tpr = uint32(v)
	_, ok := l.pendingLocked()
	l.mu.Unlock()
	if ok {
		l.cfg.Notify()
	}
}

// Accepted returns how many interrupts were accepted into the IRR and how
// many were injected (AckInterrupt).
func (l *LAPIC) Accepted() (accepted, injected int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.accepted, l.injected
}

// Accept delivers a message addressed to this local APIC.
func (l *LAPIC) Accept(m Message) {
	l.mu.Lock()
	notify := l.acceptLocked(m)
	l.mu.Unlock()
	if notify {
		l.cfg.Notify()
	}
}

func (l *LAPIC) acceptLocked(m Message) (notify bool) {
	switch m.Mode {
	case Fixed, LowestPriority:
		if !l.enabledLocked() {
			return false // a software-disabled APIC accepts only NMI, INIT, SIPI
		}
		if m.Level && !m.Assert {
			return false
		}
		if m.Vector < 16 {
			l.esr |= esrIllegalVec
			return false
		}
		setBit(&l.irr, m.Vector)
		if m.Level {
			setBit(&l.tmr, m.Vector)
		} else {
			clearBit(&l.tmr, m.Vector)
		}
		l.accepted++
		_, ok := l.pendingLocked()
		return ok
	case NMI:
		l.nmi = true
		return true
	case INIT:
		if m.Level && !m.Assert {
			return false // INIT level de-assert: arbitration ID sync only
		}
		l.init, l.sipi = true, false
		return true
	case StartUp:
		l.sipi, l.sipiVec = true, m.Vector
		return true
	}
	return false // SMI, ExtINT: no SMM and no 8259 in distributed mode
}

// LINT raises an edge on local interrupt pin 0 or 1, delivered as its LVT
// entry says (fixed or NMI; ExtINT needs a PIC there is none of).
func (l *LAPIC) LINT(pin int) {
	l.mu.Lock()
	e := l.lvt[lvtLINT0+pin&1]
	var notify bool
	if e&lvtMasked == 0 {
		mode := DeliveryMode(e >> 8 & 7)
		level := e&(1<<15) != 0 && mode == Fixed
		notify = l.acceptLocked(Message{Vector: uint8(e), Mode: mode, Level: level, Assert: true, Source: -1})
	}
	l.mu.Unlock()
	if notify {
		l.cfg.Notify()
	}
}

// Read reads a register through the MMIO page (off is the offset in it).
func (l *LAPIC) Read(off uint64, data []byte) {
	var b [8]byte
	if off&0xF < 4 {
		l.mu.Lock()
		binary.LittleEndian.PutUint32(b[:], l.readLocked(off&^0xF))
		l.mu.Unlock()
	}
	copy(data, b[off&3:])
}

func (l *LAPIC) readLocked(reg uint64) uint32 {
	switch {
	case reg == RegID:
		return l.id
	case reg == RegVersion:
		return lapicVersion
	case reg == RegTPR:
		return l.tpr
	case reg == RegAPR:
		return 0
	case reg == RegPPR:
		return l.pprLocked()
	case reg == RegLDR:
		return l.ldr
	case reg == RegDFR:
		return l.dfr
	case reg == RegSVR:
		return l.svr
	case reg >= RegISR && reg < RegISR+0x80:
		return l.isr[(reg-RegISR)/16]
	case reg >= RegTMR && reg < RegTMR+0x80:
		return l.tmr[(reg-RegTMR)/16]
	case reg >= RegIRR && reg < RegIRR+0x80:
		return l.irr[(reg-RegIRR)/16]
	case reg == RegESR:
		return l.esr
	case reg == RegICRLow:
		return l.icrLo &^ icrPending // delivered at once: always idle
	case reg == RegICRHigh:
		return l.icrHi
	case reg == RegTimerInit:
		return l.timerInit
	case reg == RegTimerCount:
		return l.currentCountLocked()
	case reg == RegTimerDiv:
		return l.timerDiv
	}
	for i, o := range lvtOffsets {
		if reg == o {
			return l.lvt[i]
		}
	}
	return 0
}

// Write writes a register through the MMIO page. Only aligned 32-bit
// writes are architectural; others are ignored.
func (l *LAPIC) Write(off uint64, data []byte) {
	if off&0xF != 0 || len(data) != 4 {
		return
	}
	v := binary.LittleEndian.Uint32(data)
	var after []func()
	l.mu.Lock()
	switch reg := off; {
	case reg == RegID:
		l.id = v & 0xFF000000
		after = append(after, l.changedLocked())
	case reg == RegTPR:
		l.tpr = v & 0xFF
		if _, ok := l.pendingLocked(); ok {
			after = append(after, l.cfg.Notify)
		}
	case reg == RegEOI:
		after = append(after, l.eoiLocked()...)
	case reg == RegLDR:
		l.ldr = v & 0xFF000000
		after = append(after, l.changedLocked())
	case reg == RegDFR:
		l.dfr = v | 0x0FFFFFFF
		after = append(after, l.changedLocked())
	case reg == RegSVR:
		l.svr = v & 0x13FF
		if !l.enabledLocked() {
			for i := range l.lvt {
				l.lvt[i] |= lvtMasked
			}
		} else if _, ok := l.pendingLocked(); ok {
			after = append(after, l.cfg.Notify)
		}
	case reg == RegESR:
		l.esr = 0
	case reg == RegICRHigh:
		l.icrHi = v & 0xFF000000
	case reg == RegICRLow:
		l.icrLo = v &^ icrPending
		m := Message{Vector: uint8(v), Mode: DeliveryMode(v >> 8 & 7), Logical: v&(1<<11) != 0,
			Assert: v&(1<<14) != 0, Level: v&(1<<15) != 0, Shorthand: uint8(v >> 18 & 3),
			Dest: uint8(l.icrHi >> 24), Source: l.cfg.ID}
		switch {
		case !m.Mode.Valid() || m.Mode == SMI || m.Mode == ExtINT:
		case (m.Mode == Fixed || m.Mode == LowestPriority) && m.Vector < 16:
			l.esr |= esrSendIllVec
		default:
			send := l.cfg.Send
			after = append(after, func() { send(m) })
		}
	case reg == RegTimerInit:
		l.timerInit = v
		l.armTimerLocked()
	case reg == RegTimerDiv:
		l.timerDiv = v & 0xB
		l.armTimerLocked()
	default:
		idx := -1
		for i, o := range lvtOffsets {
			if reg == o {
				idx = i
			}
		}
		if idx < 0 {
			if reg != RegEOI {
				l.esr |= esrIllegalReg
			}
			break
		}
		mask := uint32(0x1_07FF | 1<<13 | 1<<15) // vector, delivery mode, polarity, trigger, mask
		if idx == lvtTimer {
			mask = 0xFF | lvtMasked | lvtTimerMode
		} else if idx != lvtLINT0 && idx != lvtLINT1 {
			mask = 0x7FF | lvtMasked
		}
		v &= mask
		if !l.enabledLocked() {
			v |= lvtMasked
		}
		old := l.lvt[idx]
		l.lvt[idx] = v
		if idx == lvtTimer && old&lvtTimerMode != v&lvtTimerMode {
			// Changing the mode disarms the timer (SDM 10.5.4.1).
			l.stopTimerLocked()
			l.timerInit, l.deadline = 0, 0
		}
	}
	l.mu.Unlock()
	for _, f := range after {
		f()
	}
}

func (l *LAPIC) changedLocked() func() {
	v, changed := l.viewLocked(), l.cfg.Changed
	return func() { changed(v) }
}

// eoiLocked retires the highest in-service vector.
func (l *LAPIC) eoiLocked() []func() {
	h := highest(&l.isr)
	if h < 0 {
		return nil
	}
	vec := uint8(h)
	clearBit(&l.isr, vec)
	var after []func()
	if testBit(&l.tmr, vec) {
		clearBit(&l.tmr, vec)
		eoi := l.cfg.EOI
		after = append(after, func() { eoi(vec) })
	}
	if _, ok := l.pendingLocked(); ok {
		after = append(after, l.cfg.Notify)
	}
	return after
}

// --- timer ---

func (l *LAPIC) divisorLocked() uint32 {
	d := l.timerDiv&3 | (l.timerDiv&8)>>1
	if d == 7 {
		return 1
	}
	return 2 << d
}

func (l *LAPIC) stopTimerLocked() {
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	l.gen++
	l.period = 0
}

// armTimerLocked (re)starts the one-shot or periodic countdown from the
// initial count; a count of 0 stops it.
func (l *LAPIC) armTimerLocked() {
	if l.lvt[lvtTimer]&lvtTimerMode == timerDeadline {
		return // initial count is ignored in TSC-deadline mode
	}
	l.stopTimerLocked()
	if l.timerInit == 0 {
		return
	}
	l.period = time.Duration(uint64(l.timerInit)*uint64(l.divisorLocked())) * time.Second / TimerHz
	l.start = l.cfg.Clock.Now()
	l.scheduleLocked(l.period)
}

func (l *LAPIC) scheduleLocked(d time.Duration) {
	gen := l.gen
	l.timer = l.cfg.Clock.AfterFunc(d, func() { l.expire(gen) })
}

// currentCountLocked computes the current count from the clock.
func (l *LAPIC) currentCountLocked() uint32 {
	if l.period <= 0 || l.lvt[lvtTimer]&lvtTimerMode == timerDeadline {
		return 0
	}
	el := l.cfg.Clock.Now().Sub(l.start)
	if l.lvt[lvtTimer]&lvtTimerMode == timerPeriodic {
		el %= l.period
	} else if el >= l.period {
		return 0
	}
	left := l.period - el
	return uint32(uint64(left) * TimerHz / uint64(time.Second) / uint64(l.divisorLocked()))
}

// expire runs when a timer fires.
func (l *LAPIC) expire(gen uint64) {
	l.mu.Lock()
	if gen != l.gen {
		l.mu.Unlock()
		return // stopped or re-armed since
	}
	e := l.lvt[lvtTimer]
	switch e & lvtTimerMode {
	case timerPeriodic:
		// Next expiry from the previous one, so the period does not drift.
		l.start = l.start.Add(l.period)
		next := l.start.Add(l.period).Sub(l.cfg.Clock.Now())
		if next < 0 {
			// Fell behind (host busy): skip ticks rather than storm.
			l.start = l.cfg.Clock.Now()
			next = l.period
		}
		l.scheduleLocked(next)
	case timerDeadline:
		l.deadline = 0
		l.timer = nil
	default:
		l.timer = nil
		l.period = 0
	}
	var notify bool
	if e&lvtMasked == 0 {
		notify = l.acceptLocked(Message{Vector: uint8(e), Mode: Fixed, Assert: true, Source: -1})
	}
	l.mu.Unlock()
	if notify {
		l.cfg.Notify()
	}
}

// SetTSCHz sets the guest TSC frequency (known once the vCPU exists).
func (l *LAPIC) SetTSCHz(hz uint64) {
	l.mu.Lock()
	l.cfg.TSCHz = hz
	l.mu.Unlock()
}

// SetTSCDeadline writes IA32_TSC_DEADLINE: the timer fires when the guest
// TSC reaches deadline; now is the guest TSC at the time of the write. 0
// disarms. Ignored unless the LVT timer is in TSC-deadline mode.
func (l *LAPIC) SetTSCDeadline(deadline, now uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lvt[lvtTimer]&lvtTimerMode != timerDeadline {
		return
	}
	l.stopTimerLocked()
	l.deadline = deadline
	if deadline == 0 {
		return
	}
	var d time.Duration
	if deadline > now && l.cfg.TSCHz > 0 {
		ticks := deadline - now
		hi, lo := bits.Mul64(ticks, uint64(time.Second))
		if hi >= l.cfg.TSCHz {
			d = time.Duration(1<<63 - 1)
		} else {
			q, _ := bits.Div64(hi, lo, l.cfg.TSCHz)
			d = time.Duration(min(q, 1<<63-1))
		}
	}
	if s := l.cfg.TimerSlack; s > 0 && d < time.Duration(1<<62) {
		at := l.cfg.Clock.Now().UnixNano() + int64(d)
		d += time.Duration((int64(s) - at%int64(s)) % int64(s))
	}
	l.scheduleLocked(d)
}

// TSCDeadline reads IA32_TSC_DEADLINE (0 once it fired or when disarmed).
func (l *LAPIC) TSCDeadline() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lvt[lvtTimer]&lvtTimerMode != timerDeadline {
		return 0
	}
	return l.deadline
}

// Describe is a one-line summary of the APIC's state for a hung-guest
// report: enabled, TPR, highest ISR and IRR vectors, the timer's LVT entry
// and whether it is armed.
func (l *LAPIC) Describe() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	armed := "no"
	if l.timer != nil {
		armed = "yes"
	}
	return fmt.Sprintf("apic enabled=%v tpr=%#x isr=%d irr=%d lvtt=%#x timer-armed=%s tsc-deadline=%d accepted=%d injected=%d",
		l.enabledLocked(), l.tpr, highest(&l.isr), highest(&l.irr), l.lvt[lvtTimer], armed, l.deadline, l.accepted, l.injected)
}
