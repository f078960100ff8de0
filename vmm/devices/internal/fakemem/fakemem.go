// Package fakemem is a []byte-backed memory.Guest for device tests.
package fakemem

import (
	"fmt"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Mem is guest RAM at guest-physical [0, len). It is safe for concurrent
// use: the test "driver" and a device worker touch it at the same time.
type Mem struct {
	mu  sync.Mutex
	buf []byte
}

var _ memory.Guest = (*Mem)(nil)

// New returns size bytes of zeroed fake guest RAM.
func New(size int) *Mem { return &Mem{buf: make([]byte, size)} }

// Size is the RAM size in bytes.
func (m *Mem) Size() uint64 { return uint64(len(m.buf)) }

func (m *Mem) check(off int64, n int) error {
	if off < 0 || uint64(off) > uint64(len(m.buf)) || uint64(n) > uint64(len(m.buf))-uint64(off) {
		return fmt.Errorf("fakemem: access [%#x, +%#x) outside guest RAM of %#x bytes", off, n, len(m.buf))
	}
	return nil
}

// ReadAt copies guest memory at guest-physical address off into p.
func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, len(p)); err != nil {
		return 0, err
	}
	return copy(p, m.buf[off:]), nil
}

// WriteAt copies p into guest memory at guest-physical address off.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, len(p)); err != nil {
		return 0, err
	}
	return copy(m.buf[off:], p), nil
}
