package server

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// SystemClock sets CLOCK_REALTIME (needs CAP_SYS_TIME).
type SystemClock struct{}

// SetClock implements ClockSetter.
func (SystemClock) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("clock_settime: %w", err)
	}
	return nil
}

// Linux ioctl numbers from <linux/fs.h>: _IOWR('X', 119, int) and
// _IOWR('X', 120, int); x/sys/unix does not define them.
const (
	ioctlFIFREEZE = 0xc0045877
	ioctlFITHAW   = 0xc0045878
)

// FSFreezer freezes filesystems with the FIFREEZE/FITHAW ioctls (what
// fsfreeze(8) does): writes block and the on-disk state is consistent
// until thawed.
type FSFreezer struct{}

func fsIoctl(path string, req uint) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), req, 0); err != nil {
		return fmt.Errorf("ioctl on %s: %w", path, err)
	}
	return nil
}

// Freeze implements Freezer.
func (FSFreezer) Freeze(p string) error { return fsIoctl(p, ioctlFIFREEZE) }

// Thaw implements Freezer.
func (FSFreezer) Thaw(p string) error { return fsIoctl(p, ioctlFITHAW) }

// SystemPower syncs and calls reboot(2) directly: jobs have finished, so no
// service shutdown is needed, and the VMM sees the ACPI power-off (or the
// reset) at once.
type SystemPower struct{}

// Poweroff implements Power.
func (SystemPower) Poweroff(reboot bool) error {
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	return unix.Reboot(cmd)
}

var (
	_ ClockSetter = SystemClock{}
	_ Freezer     = FSFreezer{}
	_ Power       = SystemPower{}
)
