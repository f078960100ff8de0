// Package boottimer is an MMIO device the guest writes to once it reaches
// userspace, so the VMM can measure boot time from the guest's point of view.
package boottimer

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// Size is the MMIO window: register at layout.BootTimerAddr.
const Size = layout.BootTimerSize

// Timer records the first write of layout.BootTimerMagic.
type Timer struct {
	start  time.Time
	log    *slog.Logger
	onBoot func(time.Duration)

	mu      sync.Mutex
	elapsed time.Duration
	done    bool
}

var _ bus.Device = (*Timer)(nil)

// New returns a timer measuring from start. onBoot, if not nil, is called
// (on the vCPU thread; it must not block) the first time the guest signals.
func New(start time.Time, onBoot func(time.Duration), log *slog.Logger) *Timer {
	if log == nil {
		log = slog.Default()
	}
	return &Timer{start: start, onBoot: onBoot, log: log}
}

// Read implements bus.Device; the device reads as zero.
func (t *Timer) Read(offset uint64, data []byte) { clear(data) }

// Write implements bus.Device. Only the low byte of an access of any width
// is compared with the magic value, as guests use whatever store is handy.
func (t *Timer) Write(offset uint64, data []byte) {
	if len(data) == 0 || data[0] != layout.BootTimerMagic {
		return
	}
	t.mu.Lock()
	if t.done {
		t.mu.Unlock()
		return
	}
	t.elapsed, t.done = time.Since(t.start), true
	d := t.elapsed
	t.mu.Unlock()
	t.log.Info(fmt.Sprintf("guest reached userspace after %v", d), "elapsed", d)
	if t.onBoot != nil {
		t.onBoot(d)
	}
}

// Elapsed returns the time from start to the guest's signal and whether the
// signal has arrived.
func (t *Timer) Elapsed() (time.Duration, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.elapsed, t.done
}

// StateVersion is the current version of State.
const StateVersion = 1

// State is the timer's state (version 1). The start instant is not saved:
// a restored VM has already booted or measures from its new start.
type State struct {
	Version uint32
	Done    bool
	Elapsed time.Duration
}

// State captures the timer.
func (t *Timer) State() State {
	t.mu.Lock()
	defer t.mu.Unlock()
	return State{Version: StateVersion, Done: t.done, Elapsed: t.elapsed}
}

// Restore loads s.
func (t *Timer) Restore(s State) error {
	if s.Version != StateVersion {
		return fmt.Errorf("boottimer state version %d, want %d", s.Version, StateVersion)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.done, t.elapsed = s.Done, s.Elapsed
	return nil
}
