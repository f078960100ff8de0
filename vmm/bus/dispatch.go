package bus

import (
	"fmt"
	"sort"
	"sync"
)

type entry struct {
	base, size uint64
	name       string
	dev        Device
}

// Bus is an address space (port I/O or MMIO) with devices registered at
// non-overlapping ranges. It is safe for concurrent use by vCPU threads;
// each device does its own locking.
type Bus struct {
	mu      sync.RWMutex
	entries []entry // sorted by base
}

// Register places dev at [base, base+size). name is used in errors.
func (b *Bus) Register(name string, base, size uint64, dev Device) error {
	if size == 0 {
		return fmt.Errorf("bus: device %s: zero size", name)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, e := range b.entries {
		if base < e.base+e.size && e.base < base+size {
			return fmt.Errorf("bus: device %s at %#x+%#x overlaps %s at %#x+%#x", name, base, size, e.name, e.base, e.size)
		}
	}
	b.entries = append(b.entries, entry{base: base, size: size, name: name, dev: dev})
	sort.Slice(b.entries, func(i, j int) bool { return b.entries[i].base < b.entries[j].base })
	return nil
}

func (b *Bus) find(addr uint64) (entry, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	i := sort.Search(len(b.entries), func(i int) bool { return b.entries[i].base+b.entries[i].size > addr })
	if i < len(b.entries) && b.entries[i].base <= addr {
		return b.entries[i], true
	}
	return entry{}, false
}

// Read dispatches a read. It reports false (and fills data with 0xff, as an
// unclaimed bus reads on x86) when no device is at addr.
func (b *Bus) Read(addr uint64, data []byte) bool {
	e, ok := b.find(addr)
	if !ok {
		for i := range data {
			data[i] = 0xff
		}
		return false
	}
	e.dev.Read(addr-e.base, data)
	return true
}

// Write dispatches a write. It reports false when no device is at addr;
// the write is then dropped.
func (b *Bus) Write(addr uint64, data []byte) bool {
	e, ok := b.find(addr)
	if !ok {
		return false
	}
	e.dev.Write(addr-e.base, data)
	return true
}
