// Package testmem is a []byte-backed memory.Guest for the boot path's tests.
package testmem

import (
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Region is one RAM range of a Mem.
type Region struct {
	GPA  uint64
	Data []byte
}

// Mem is guest memory made of disjoint byte slices; addresses outside them
// are holes, as in the real guest RAM.
type Mem struct{ Regions []Region }

var _ memory.Guest = (*Mem)(nil)

// New returns low RAM of the given size at guest-physical 0.
func New(size uint64) *Mem { return &Mem{Regions: []Region{{GPA: 0, Data: make([]byte, size)}}} }

// Size is the total RAM.
func (m *Mem) Size() uint64 {
	var n uint64
	for _, r := range m.Regions {
		n += uint64(len(r.Data))
	}
	return n
}

func (m *Mem) find(off int64, n int) ([]byte, error) {
	if off < 0 {
		return nil, fmt.Errorf("negative guest address %d", off)
	}
	a := uint64(off)
	for _, r := range m.Regions {
		if a >= r.GPA && a-r.GPA < uint64(len(r.Data)) {
			b := r.Data[a-r.GPA:]
			if uint64(n) > uint64(len(b)) {
				return b, fmt.Errorf("guest access [%#x, %#x) runs past RAM end %#x", a, a+uint64(n), r.GPA+uint64(len(r.Data)))
			}
			return b[:n], nil
		}
	}
	return nil, fmt.Errorf("guest address %#x is not RAM", a)
}

// ReadAt reads guest-physical memory.
func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	b, err := m.find(off, len(p))
	return copy(p, b), err
}

// WriteAt writes guest-physical memory.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	b, err := m.find(off, len(p))
	return copy(b, p), err
}

// Bytes returns n bytes at guest-physical addr, or panics: tests only.
func (m *Mem) Bytes(addr uint64, n int) []byte {
	b, err := m.find(int64(addr), n)
	if err != nil {
		panic(err)
	}
	return b
}
