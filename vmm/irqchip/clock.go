package irqchip

import "time"

// Clock is the time source of the APIC timers: the host clock in a VMM, a
// manual one in tests.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f on its own goroutine once d has passed.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a pending AfterFunc.
type Timer interface {
	Stop() bool
}

// HostClock is the host's monotonic clock.
type HostClock struct{}

func (HostClock) Now() time.Time { return time.Now() }
func (HostClock) AfterFunc(d time.Duration, f func()) Timer {
	return time.AfterFunc(d, f)
}
