package dsm

import (
	"encoding/binary"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// pageTablePages returns the guest pages that are page tables of the
// 4-level (long mode) address space rooted at cr3: the root and every
// table a present non-leaf entry points to, at most limit pages. Entries
// pointing outside RAM are skipped. It reads through mem (coherently).
func pageTablePages(mem memory.Guest, cr3 uint64, limit int) (map[uint64]bool, error) {
	set := map[uint64]bool{}
	buf := make([]byte, PageSize)
	var walk func(table uint64, level int) error
	walk = func(table uint64, level int) error {
		pfn := table / PageSize
		if set[pfn] || len(set) >= limit {
			return nil
		}
		if level == 1 {
			set[pfn] = true // a last-level table: its entries map pages
			return nil
		}
		if _, err := mem.ReadAt(buf, int64(table)); err != nil {
			return nil // not RAM: no table there
		}
		set[pfn] = true
		entries := make([]uint64, 0, 8)
		for i := 0; i < wordsPerPage; i++ {
			e := binary.LittleEndian.Uint64(buf[8*i:])
			const huge = 1 << 7 // a 1 GiB or 2 MiB page, not a table
			if e&ptePresent == 0 || level <= 3 && e&huge != 0 {
				continue
			}
			entries = append(entries, e&pteFrame)
		}
		for _, t := range entries {
			if err := walk(t, level-1); err != nil {
				return err
			}
		}
		return nil
	}
	return set, walk(cr3&pteFrame, 4)
}
