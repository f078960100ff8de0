// Package uffd wraps Linux userfaultfd: registering guest RAM so that a
// missing page or a write to a write-protected page blocks the touching
// thread (a vCPU inside KVM_RUN, or a VMM thread) until a handler resolves it
// with Copy, ZeroPage, WriteProtect or Wake. The distributed shared memory
// layer (vmm/dsm) uses it to fetch pages from other slices on demand.
package uffd

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// DevicePath is the userfaultfd device (Linux >= 6.1), usable by root when
// vm.unprivileged_userfaultfd is 0.
const DevicePath = "/dev/userfaultfd"

const apiVersion = 0xAA // UFFD_API

// Features are UFFD_FEATURE_* bits negotiated with UFFDIO_API.
type Features uint64

const (
	FeaturePagefaultFlagWP Features = 1 << 0  // write-protect faults
	FeatureThreadID        Features = 1 << 8  // faulting thread id in events
	FeatureWPUnpopulated   Features = 1 << 13 // WP also covers unpopulated pages
)

// RegisterMode selects which faults a registered range reports.
type RegisterMode uint64

const (
	ModeMissing RegisterMode = 1 << 0 // UFFDIO_REGISTER_MODE_MISSING
	ModeWP      RegisterMode = 1 << 1 // UFFDIO_REGISTER_MODE_WP
)

// Pagefault flags of an event.
const (
	flagWrite = 1 << 0 // UFFD_PAGEFAULT_FLAG_WRITE
	flagWP    = 1 << 1 // UFFD_PAGEFAULT_FLAG_WP
)

const eventPagefault = 0x12 // UFFD_EVENT_PAGEFAULT

// ErrExist is returned by Copy and ZeroPage when the page is already mapped
// (another thread resolved the fault first).
var ErrExist = errors.New("uffd: page already present")

// ErrClosed is returned by ReadEvents once the FD is closed.
var ErrClosed = errors.New("uffd: userfaultfd closed")

// Event is one fault reported by the kernel.
type Event struct {
	Kind    uint8
	Flags   uint64
	Address uint64 // faulting host virtual address (page-aligned unless EXACT_ADDRESS)
	TID     uint32 // faulting thread, if FeatureThreadID was negotiated
}

// Pagefault reports whether the event is a page fault (the only kind this
// package enables).
func (e Event) Pagefault() bool { return e.Kind == eventPagefault }

// Write reports whether the faulting access was a write.
func (e Event) Write() bool { return e.Flags&flagWrite != 0 }

// WP reports whether the fault hit a write-protected present page (as
// opposed to a missing page).
func (e Event) WP() bool { return e.Flags&flagWP != 0 }

func (e Event) String() string {
	kind := "missing"
	if e.WP() {
		kind = "wp"
	}
	access := "read"
	if e.Write() {
		access = "write"
	}
	return fmt.Sprintf("%s %s fault at %#x (tid %d)", kind, access, e.Address, e.TID)
}

// FD is an open, API-negotiated userfaultfd. The descriptor is
// non-blocking; ReadEvents waits in poll(2) on it and on an eventfd that
// Close signals, so Close unblocks a concurrent ReadEvents. (The Go poller
// is not used: registration of a userfaultfd with it was seen to fail
// intermittently, leaving reads "not pollable".)
type FD struct {
	mu       sync.RWMutex // held (read) while fd is in use; Close takes it to close fd
	fd       int
	efd      int // eventfd signalled by Close
	features Features
	closed   atomic.Bool
	rmu      sync.Mutex // the event reader's buffer
	rbuf     []byte
}

// Open creates a userfaultfd and negotiates the required features plus
// whichever optional ones the kernel supports.
func Open(required, optional Features) (*FD, error) {
	supported, err := probe()
	if err != nil {
		return nil, err
	}
	if missing := required &^ supported; missing != 0 {
		return nil, fmt.Errorf("uffd: kernel lacks required features %#x (supports %#x)", uint64(missing), uint64(supported))
	}
	want := required | optional&supported
	u, err := open()
	if err != nil {
		return nil, err
	}
	api := uffdioAPI{API: apiVersion, Features: uint64(want)}
	if err := ioctlOn(u, ioctlAPI, &api); err != nil {
		u.Close()
		return nil, fmt.Errorf("uffd: UFFDIO_API with features %#x: %w", uint64(want), err)
	}
	u.features = want
	return u, nil
}

// probe asks a throwaway userfaultfd which features the kernel supports.
func probe() (Features, error) {
	u, err := open()
	if err != nil {
		return 0, err
	}
	defer u.Close()
	api := uffdioAPI{API: apiVersion}
	if err := ioctlOn(u, ioctlAPI, &api); err != nil {
		return 0, fmt.Errorf("uffd: UFFDIO_API probe: %w", err)
	}
	return Features(api.Features), nil
}

// open gets a userfaultfd from /dev/userfaultfd, or from the syscall when
// the device is missing. Kernel-mode faults (KVM's accesses to guest RAM)
// must be reported, so UFFD_USER_MODE_ONLY is not set.
func open() (*FD, error) {
	flags := uintptr(unix.O_CLOEXEC | unix.O_NONBLOCK)
	var fd int
	dev, derr := os.OpenFile(DevicePath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if derr == nil {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, dev.Fd(), ioctlNew, flags)
		dev.Close()
		if e != 0 {
			return nil, fmt.Errorf("uffd: USERFAULTFD_IOC_NEW on %s: %w", DevicePath, e)
		}
		fd = int(r)
	} else {
		r, _, e := unix.Syscall(unix.SYS_USERFAULTFD, flags, 0, 0)
		if e != 0 {
			return nil, fmt.Errorf("uffd: userfaultfd syscall: %w (and %s: %v)", e, DevicePath, derr)
		}
		fd = int(r)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: eventfd: %w", err)
	}
	return &FD{fd: fd, efd: efd}, nil
}

// Features returns the negotiated features.
func (u *FD) Features() Features { return u.features }

// Close releases the userfaultfd. The kernel then wakes every thread blocked
// on one of its faults and unregisters its ranges (later faults are
// ordinary anonymous-memory faults).
func (u *FD) Close() error {
	if u.closed.Swap(true) {
		return nil
	}
	var one [8]byte
	one[0] = 1
	unix.Write(u.efd, one[:]) // wake ReadEvents (eventfd counters are host-endian; any non-zero value works)
	u.mu.Lock()
	defer u.mu.Unlock()
	unix.Close(u.efd)
	return unix.Close(u.fd)
}

// Register arms [addr, addr+n) (page-aligned) for the given fault modes.
func (u *FD) Register(addr uintptr, n uint64, mode RegisterMode) error {
	r := uffdioRegister{Range: uffdioRange{Start: uint64(addr), Len: n}, Mode: uint64(mode)}
	if err := ioctlOn(u, ioctlRegister, &r); err != nil {
		return fmt.Errorf("uffd: UFFDIO_REGISTER %#x+%#x mode %#x: %w", addr, n, uint64(mode), err)
	}
	return nil
}

// Unregister disarms [addr, addr+n).
func (u *FD) Unregister(addr uintptr, n uint64) error {
	r := uffdioRange{Start: uint64(addr), Len: n}
	if err := ioctlOn(u, ioctlUnregister, &r); err != nil {
		return fmt.Errorf("uffd: UFFDIO_UNREGISTER %#x+%#x: %w", addr, n, err)
	}
	return nil
}

// Copy atomically fills the missing pages at dst with src (len(src) a
// multiple of the page size). With wp the pages are installed
// write-protected (a later write raises a WP fault). Unless dontWake,
// threads blocked on the range are woken. ErrExist means already mapped.
func (u *FD) Copy(dst uintptr, src []byte, wp, dontWake bool) error {
	c := uffdioCopy{Dst: uint64(dst), Src: bytesAddr(src), Len: uint64(len(src))}
	if dontWake {
		c.Mode |= 1 << 0
	}
	if wp {
		c.Mode |= 1 << 1
	}
	for {
		err := ioctlOn(u, ioctlCopy, &c)
		runtime.KeepAlive(src)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EEXIST):
			return ErrExist
		case errors.Is(err, unix.EAGAIN) && c.Copy > 0:
			// Partial copy: continue after what was copied.
			c.Dst += uint64(c.Copy)
			c.Src += uint64(c.Copy)
			c.Len -= uint64(c.Copy)
			c.Copy = 0
		case errors.Is(err, unix.EAGAIN):
			// The mm changed under us (e.g. a concurrent madvise): retry.
			c.Copy = 0
		default:
			return fmt.Errorf("uffd: UFFDIO_COPY to %#x (%d bytes): %w", dst, len(src), err)
		}
	}
}

// ZeroPage maps zero pages at [dst, dst+n).
func (u *FD) ZeroPage(dst uintptr, n uint64, dontWake bool) error {
	z := uffdioZeropage{Range: uffdioRange{Start: uint64(dst), Len: n}}
	if dontWake {
		z.Mode = 1
	}
	for {
		err := ioctlOn(u, ioctlZeropage, &z)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EEXIST):
			return ErrExist
		case errors.Is(err, unix.EAGAIN):
			z.Zeropage = 0
		default:
			return fmt.Errorf("uffd: UFFDIO_ZEROPAGE %#x+%#x: %w", dst, n, err)
		}
	}
}

// WriteProtect sets (protect) or clears write protection on the populated
// pages of [addr, addr+n). Clearing wakes threads blocked in WP faults on
// the range unless dontWake. Without FeatureWPUnpopulated unpopulated
// pages are silently skipped. The kernel refuses dontWake when protecting
// (there is nothing to wake).
func (u *FD) WriteProtect(addr uintptr, n uint64, protect, dontWake bool) error {
	if protect && dontWake {
		return fmt.Errorf("uffd: UFFDIO_WRITEPROTECT %#x+%#x: dontWake is only valid when clearing protection", addr, n)
	}
	w := uffdioWriteprotect{Range: uffdioRange{Start: uint64(addr), Len: n}}
	if protect {
		w.Mode |= 1 << 0
	}
	if dontWake {
		w.Mode |= 1 << 1
	}
	for {
		err := ioctlOn(u, ioctlWriteprotect, &w)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EAGAIN):
		default:
			return fmt.Errorf("uffd: UFFDIO_WRITEPROTECT %#x+%#x protect=%v: %w", addr, n, protect, err)
		}
	}
}

// Wake wakes threads blocked on faults in [addr, addr+n) (after the page
// was resolved some other way); they retry the access.
func (u *FD) Wake(addr uintptr, n uint64) error {
	r := uffdioRange{Start: uint64(addr), Len: n}
	if err := ioctlOn(u, ioctlWake, &r); err != nil {
		return fmt.Errorf("uffd: UFFDIO_WAKE %#x+%#x: %w", addr, n, err)
	}
	return nil
}

// ReadEvents blocks until at least one fault is pending and fills evs.
// After Close it returns ErrClosed.
func (u *FD) ReadEvents(evs []Event) (int, error) { return u.ReadEventsSpin(evs, 0) }

// ReadEventsSpin is ReadEvents that first polls without sleeping for up
// to spin: a fault that comes within spin is then served without a
// thread wake-up (at the price of a busy CPU meanwhile). Only one
// goroutine may read events at a time.
func (u *FD) ReadEventsSpin(evs []Event, spin time.Duration) (int, error) {
	u.mu.RLock()
	defer u.mu.RUnlock()
	u.rmu.Lock()
	defer u.rmu.Unlock()
	if n := len(evs) * msgSize; cap(u.rbuf) < n {
		u.rbuf = make([]byte, n)
	}
	buf := u.rbuf[:len(evs)*msgSize]
	var until time.Time
	if spin > 0 {
		until = time.Now().Add(spin)
	}
	for {
		if u.closed.Load() {
			return 0, ErrClosed
		}
		n, err := unix.Read(u.fd, buf)
		if err == nil {
			return decodeMsgs(buf[:n], evs), nil
		}
		if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			return 0, fmt.Errorf("uffd: read events: %w", err)
		}
		if spin > 0 && time.Now().Before(until) {
			continue
		}
		fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}, {Fd: int32(u.efd), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			return 0, fmt.Errorf("uffd: poll: %w", err)
		}
		if spin > 0 {
			until = time.Now().Add(spin)
		}
	}
}

// DropPages discards the contents of [addr, addr+n) of private anonymous
// memory (MADV_DONTNEED): the next access is a missing fault again.
func DropPages(b []byte) error {
	if err := unix.Madvise(b, unix.MADV_DONTNEED); err != nil {
		return fmt.Errorf("uffd: madvise(DONTNEED) %#x+%#x: %w", Addr(b), len(b), err)
	}
	return nil
}
