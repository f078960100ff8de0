package uffd

import (
	"bytes"
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const pageSize = 4096

func requireUFFD(t *testing.T) *FD {
	t.Helper()
	u, err := Open(FeaturePagefaultFlagWP, FeatureThreadID|FeatureWPUnpopulated)
	if err != nil {
		if os.Geteuid() != 0 || errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS) {
			t.Skipf("userfaultfd unavailable (needs root and %s or the syscall): %v", DevicePath, err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	return u
}

func anon(t *testing.T, pages int) []byte {
	t.Helper()
	m, err := unix.Mmap(-1, 0, pages*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

// nextEvent reads one event with a deadline so a broken test fails instead
// of hanging.
func nextEvent(t *testing.T, u *FD) Event {
	t.Helper()
	ch := make(chan Event, 1)
	errc := make(chan error, 1)
	go func() {
		evs := make([]Event, 1)
		if _, err := u.ReadEvents(evs); err != nil {
			errc <- err
			return
		}
		ch <- evs[0]
	}()
	select {
	case e := <-ch:
		return e
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("no userfaultfd event within 10s")
	}
	return Event{}
}

// touch runs f on its own OS thread (it blocks in the fault) and returns a
// channel closed when f returns.
func touch(f func()) chan struct{} {
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		f()
		close(done)
	}()
	return done
}

func wait(t *testing.T, done chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not complete within 10s", what)
	}
}

func TestMissingCopyWriteProtectDrop(t *testing.T) {
	u := requireUFFD(t)
	mem := anon(t, 4)
	base := Addr(mem)
	if err := u.Register(base, uint64(len(mem)), ModeMissing|ModeWP); err != nil {
		t.Fatal(err)
	}

	// 1. A read of a missing page blocks until Copy(wp) installs it.
	var got byte
	done := touch(func() { got = mem[pageSize+7] })
	ev := nextEvent(t, u)
	if !ev.Pagefault() || ev.WP() || ev.Write() || ev.Address != uint64(base+pageSize) {
		t.Fatalf("event %v, want missing read fault at %#x", ev, base+pageSize)
	}
	src := bytes.Repeat([]byte{0xAB}, pageSize)
	if err := u.Copy(base+pageSize, src, true, false); err != nil {
		t.Fatal(err)
	}
	wait(t, done, "read of copied page")
	if got != 0xAB {
		t.Fatalf("read %#x after copy, want 0xab", got)
	}
	if err := u.Copy(base+pageSize, src, false, false); !errors.Is(err, ErrExist) {
		t.Fatalf("second copy: %v, want ErrExist", err)
	}

	// 2. A write to the write-protected copy raises a WP write fault and
	// proceeds once protection is cleared.
	done = touch(func() { mem[pageSize+8] = 0xCD })
	ev = nextEvent(t, u)
	if !ev.WP() || !ev.Write() || ev.Address != uint64(base+pageSize) {
		t.Fatalf("event %v, want wp write fault at %#x", ev, base+pageSize)
	}
	if err := u.WriteProtect(base+pageSize, pageSize, false, false); err != nil {
		t.Fatal(err)
	}
	wait(t, done, "write after clearing protection")
	if mem[pageSize+8] != 0xCD {
		t.Fatalf("write lost: %#x", mem[pageSize+8])
	}

	// 3. Setting protection again and dropping the page: the next access
	// is a missing fault, not a WP fault (private anonymous memory).
	if err := u.WriteProtect(base+pageSize, pageSize, true, false); err != nil {
		t.Fatal(err)
	}
	if err := DropPages(mem[pageSize : 2*pageSize]); err != nil {
		t.Fatal(err)
	}
	done = touch(func() { mem[pageSize] = 1 })
	ev = nextEvent(t, u)
	if ev.WP() || !ev.Write() || ev.Address != uint64(base+pageSize) {
		t.Fatalf("event %v after drop, want missing write fault", ev)
	}
	if err := u.ZeroPage(base+pageSize, pageSize, false); err != nil {
		t.Fatal(err)
	}
	wait(t, done, "write to zero page")
	if mem[pageSize] != 1 || mem[pageSize+7] != 0 {
		t.Fatalf("page after zeropage+write: %v %v", mem[pageSize], mem[pageSize+7])
	}

	// 4. Wake lets a thread retry after the page was resolved elsewhere.
	done = touch(func() { got = mem[3*pageSize] })
	ev = nextEvent(t, u)
	if err := u.Copy(base+3*pageSize, bytes.Repeat([]byte{7}, pageSize), false, true); err != nil {
		t.Fatal(err)
	}
	if err := u.Wake(base+3*pageSize, pageSize); err != nil {
		t.Fatal(err)
	}
	wait(t, done, "woken read")
	if got != 7 || ev.Address != uint64(base+3*pageSize) {
		t.Fatalf("woken read %d at event %v", got, ev)
	}
}

func TestCloseUnblocksReader(t *testing.T) {
	u := requireUFFD(t)
	errc := make(chan error, 1)
	go func() {
		_, err := u.ReadEvents(make([]Event, 4))
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	u.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("ReadEvents after Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadEvents still blocked 5s after Close")
	}
}

func TestCloseWakesBlockedFault(t *testing.T) {
	u := requireUFFD(t)
	mem := anon(t, 1)
	if err := u.Register(Addr(mem), pageSize, ModeMissing); err != nil {
		t.Fatal(err)
	}
	var got byte
	done := touch(func() { got = mem[0] })
	nextEvent(t, u)
	u.Close()
	wait(t, done, "fault after closing the userfaultfd")
	if got != 0 {
		t.Fatalf("page read after release holds %#x, want a fresh zero page", got)
	}
}
