package dsm

import (
	"fmt"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"golang.org/x/sys/unix"
)

// Guest time (docs/dsm.md): every vCPU of the VM must read the same TSC at
// the same instant, whichever slice runs it, or the guest sees time go
// backwards when work moves between vCPUs. The guest TSC is defined on
// slice 0's CLOCK_MONOTONIC: it is 0 at the epoch (slice 0's clock when
// it started) and counts at the vCPUs' TSC rate. Every other slice
// estimates the offset of slice 0's clock from its own (NTP-style, the
// sample with the shortest round trip of clockSamples, error at most half
// that round trip) and, just before each vCPU first enters the guest,
// sets the vCPU's TSC offset so its TSC matches. Slices must run at the
// same TSC frequency (hosts of one type; TSC scaling is not attempted).

const clockSamples = 8

// guestClock maps this slice's monotonic clock to the guest TSC.
type guestClock struct {
	epoch  int64 // ns on slice 0's clock at which the guest TSC is 0
	offset int64 // slice 0's clock minus this slice's
	err    int64 // bound on |offset error| (half the best round trip)
}

func monotonicNow() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// guestNS is the guest time in ns (since the epoch) at local monotonic
// time now.
func (g guestClock) guestNS(now int64) int64 {
	return max(now+g.offset-g.epoch, 0)
}

// guestTSC is the guest TSC at local monotonic time now for a TSC of khz.
func (g guestClock) guestTSC(now int64, khz uint64) uint64 {
	ns := g.guestNS(now)
	sec, rem := uint64(ns)/1e9, uint64(ns)%1e9
	return sec*khz*1000 + rem*khz/1e6
}

// syncClock sets s.clock: on slice 0 from its own clock, elsewhere by
// asking slice 0.
func (s *sliceRun) syncClock() error {
	if s.id == 0 {
		s.clock = guestClock{epoch: s.epoch}
		return nil
	}
	best := guestClock{err: -1}
	for i := 0; i < clockSamples; i++ {
		t1 := monotonicNow()
		r, err := s.node.Call(0, &Msg{Type: MsgClockReq}, nil)
		t2 := monotonicNow()
		if err != nil {
			return fmt.Errorf("dsm: slice %d: clock sample from slice 0: %w", s.id, err)
		}
		if half := (t2 - t1) / 2; best.err < 0 || half < best.err {
			best = guestClock{epoch: int64(r.Epoch), offset: int64(r.Clock) - (t1 + half), err: half}
		}
	}
	s.clock = best
	s.log.Debug("dsm: guest clock", "offset", time.Duration(best.offset), "error", time.Duration(best.err))
	return nil
}

// answerClock is slice 0's side of syncClock.
func (s *sliceRun) answerClock(from int, m *Msg) {
	s.node.send(from, &Msg{Type: MsgClockReply, ReqID: m.ReqID, Clock: uint64(monotonicNow()), Epoch: uint64(s.epoch)})
}

// setGuestTSC sets vCPU c's TSC to the VM's guest TSC now (on the vCPU's
// thread, before it first runs). The offset is adjusted from the TSC KVM
// reports, read as close as possible to the clock.
//
// Without the TSC offset attribute (Linux < 5.16) it writes IA32_TSC,
// which KVM may snap to the VM's previous TSC write (within a second):
// then slices agree only to within their start-up skew.
func (s *sliceRun) setGuestTSC(c *kvm.VCPU, khz uint64) error {
	off, err := c.TSCOffset()
	if err != nil {
		s.log.Warn("dsm: no TSC offset control, writing IA32_TSC instead (slices may disagree by their start-up skew)", "err", err)
		return c.SetMSRs([]kvm.MSREntry{{Index: msrTSC, Data: s.clock.guestTSC(monotonicNow(), khz)}})
	}
	// Read the TSC bracketed by the clock; retry a few times for a tight
	// bracket (the thread may be descheduled in between).
	var cur uint64
	var mid, width int64 = 0, -1
	for i := 0; i < 4; i++ {
		t1 := monotonicNow()
		r, err := c.GetMSRs([]uint32{msrTSC})
		t2 := monotonicNow()
		if err != nil || len(r) != 1 {
			return fmt.Errorf("vcpu %d: reading the TSC: %v", c.ID(), err)
		}
		if width < 0 || t2-t1 < width {
			cur, mid, width = r[0].Data, t1+(t2-t1)/2, t2-t1
		}
	}
	want := s.clock.guestTSC(mid, khz)
	if err := c.SetTSCOffset(off + int64(want-cur)); err != nil {
		return err
	}
	if now, err := c.TSCOffset(); err == nil && now == off && want != cur {
		s.log.Debug("dsm: KVM ignores TSC offsets (PVM): guests read the host TSC", "vcpu", c.ID())
	}
	return nil
}
