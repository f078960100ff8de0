package memory

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Region is one contiguous range of guest RAM and its host mapping.
type Region struct {
	GPA  uint64
	Host []byte
}

// End is the first guest-physical address past the region.
func (r Region) End() uint64 { return r.GPA + uint64(len(r.Host)) }

// RAM is guest RAM on a single node: private anonymous mappings, so pages
// are allocated on first touch and userfaultfd (missing/write-protect) can
// later be registered on them for checkpoints, migration and distributed
// coherence. Below-4GiB RAM stops at gapStart; the rest starts at 4 GiB.
type RAM struct {
	regions []Region
	size    uint64
}

var _ Guest = (*RAM)(nil)

// NewRAM maps size bytes of guest RAM with an MMIO hole [gapStart, 4GiB).
func NewRAM(size, gapStart uint64) (*RAM, error) {
	if size == 0 || size%PageSize != 0 {
		return nil, fmt.Errorf("guest memory size %d is not a positive multiple of %d", size, PageSize)
	}
	r := &RAM{size: size}
	low := size
	if low > gapStart {
		low = gapStart
	}
	if err := r.add(0, low); err != nil {
		return nil, err
	}
	if size > low {
		if err := r.add(1<<32, size-low); err != nil {
			r.Close()
			return nil, err
		}
	}
	return r, nil
}

func (r *RAM) add(gpa, size uint64) error {
	// MAP_NORESERVE: the guest's nominal size is not committed up front.
	m, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return fmt.Errorf("mmap %d bytes of guest memory at %#x: %w", size, gpa, err)
	}
	r.regions = append(r.regions, Region{GPA: gpa, Host: m})
	return nil
}

// Regions returns the RAM ranges (for memory slots and the e820 map).
func (r *RAM) Regions() []Region { return r.regions }

// Size is the total RAM in bytes.
func (r *RAM) Size() uint64 { return r.size }

// Close unmaps guest RAM. The RAM must not be used afterwards.
func (r *RAM) Close() error {
	var first error
	for _, reg := range r.regions {
		if err := unix.Munmap(reg.Host); err != nil && first == nil {
			first = err
		}
	}
	r.regions = nil
	return first
}

// Slice returns the host bytes backing [gpa, gpa+n), which must lie in one
// region. Only single-node code (loaders, tests) may use it: in distributed
// mode guest memory must be accessed through ReadAt/WriteAt.
func (r *RAM) Slice(gpa, n uint64) ([]byte, error) {
	for _, reg := range r.regions {
		if gpa >= reg.GPA && gpa+n <= reg.End() && gpa+n >= gpa {
			off := gpa - reg.GPA
			return reg.Host[off : off+n], nil
		}
	}
	return nil, fmt.Errorf("guest range %#x+%#x is not RAM", gpa, n)
}

func (r *RAM) access(p []byte, off int64, write bool) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative guest address %d", off)
	}
	gpa := uint64(off)
	done := 0
	for done < len(p) {
		var reg *Region
		for i := range r.regions {
			if gpa >= r.regions[i].GPA && gpa < r.regions[i].End() {
				reg = &r.regions[i]
				break
			}
		}
		if reg == nil {
			return done, fmt.Errorf("guest address %#x is not RAM", gpa)
		}
		host := reg.Host[gpa-reg.GPA:]
		var n int
		if write {
			n = copy(host, p[done:])
		} else {
			n = copy(p[done:], host)
		}
		done += n
		gpa += uint64(n)
	}
	return done, nil
}

// ReadAt reads guest memory at guest-physical address off.
func (r *RAM) ReadAt(p []byte, off int64) (int, error) { return r.access(p, off, false) }

// WriteAt writes guest memory at guest-physical address off.
func (r *RAM) WriteAt(p []byte, off int64) (int, error) { return r.access(p, off, true) }
