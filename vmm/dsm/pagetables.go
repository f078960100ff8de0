package dsm

import (
	"encoding/binary"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// TableSet maps the page frame numbers of page tables to their level (4:
// PML4, 1: the last level, whose entries map pages).
type TableSet map[uint64]int

// pageTablePages returns the guest pages that are page tables of the
// 4-level (long mode) address space rooted at cr3: the root and every
// table a present non-leaf entry points to, at most limit pages. Entries
// pointing outside RAM are skipped. It reads through mem (coherently).
func pageTablePages(mem memory.Guest, cr3 uint64, limit int) (TableSet, error) {
	set := TableSet{}
	return set, walkTables(mem, cr3&pteFrame, 4, limit, set)
}

// walkTables adds table (a page table of the given level, 4 = PML4) and
// every table under it to set, up to limit pages.
func walkTables(mem memory.Guest, table uint64, level, limit int, set TableSet) error {
	pfn := table / PageSize
	if set[pfn] != 0 || len(set) >= limit {
		return nil
	}
	if level == 1 {
		set[pfn] = 1
		return nil
	}
	buf := make([]byte, PageSize)
	if _, err := mem.ReadAt(buf, int64(table)); err != nil {
		return nil // not RAM: no table there
	}
	set[pfn] = level
	for i := 0; i < wordsPerPage; i++ {
		e := binary.LittleEndian.Uint64(buf[8*i:])
		const huge = 1 << 7 // a 1 GiB or 2 MiB page, not a table
		if e&ptePresent == 0 || level <= 3 && e&huge != 0 {
			continue
		}
		if err := walkTables(mem, e&pteFrame, level-1, limit, set); err != nil {
			return err
		}
	}
	return nil
}

// Linux on x86-64 maps its image at __START_KERNEL_map
// (0xffffffff80000000): PML4 entry 511, then PDPT entry 510, then a page
// directory of 2 MiB pages (level2_kernel_pgt) covering the loaded image.
const (
	kernelMapPML4 = 511
	kernelMapPDPT = 510
	kernelHalf    = 256 // first PML4 entry of the kernel's half
	hugeFrame     = 0x000F_FFFF_FFE0_0000
)

// kernelTablePages returns a Linux guest's kernel page tables if cr3 is
// the kernel's own address space (init_top_pgt: its root lies inside the
// kernel image, whose extent it reads off the kernel mapping — PML4 entry
// 511, PDPT entry 510's 2 MiB pages): the root and every table under the
// kernel half of the address space (the image's own static tables, the
// direct map's, vmemmap's, vmalloc's and the fixmap's), at most limit
// pages. Linux shares these with every process and, in practice, never
// frees them; publish stops the VM if the guest unlinks one anyway. It
// returns nothing for another address space.
func kernelTablePages(mem memory.Guest, cr3 uint64, limit int) (TableSet, error) {
	entry := func(table uint64, i int) (uint64, error) {
		var b [8]byte
		if _, err := mem.ReadAt(b[:], int64(table+uint64(8*i))); err != nil {
			return 0, err
		}
		return binary.LittleEndian.Uint64(b[:]), nil
	}
	const huge = 1 << 7
	root := cr3 & pteFrame
	e, err := entry(root, kernelMapPML4)
	if err != nil || e&ptePresent == 0 {
		return nil, err
	}
	if e, err = entry(e&pteFrame, kernelMapPDPT); err != nil || e&ptePresent == 0 || e&huge != 0 {
		return nil, err
	}
	pd := e & pteFrame
	inImage := false
	for i := 0; i < wordsPerPage && !inImage; i++ {
		if e, err = entry(pd, i); err != nil {
			return nil, err
		}
		inImage = e&ptePresent != 0 && e&huge != 0 && e&hugeFrame == root&hugeFrame
	}
	if !inImage {
		return nil, nil // a process's root: not the kernel's own
	}
	set := TableSet{root / PageSize: 4}
	for i := kernelHalf; i < wordsPerPage; i++ {
		if e, err = entry(root, i); err != nil {
			return nil, err
		}
		if e&ptePresent != 0 {
			if err := walkTables(mem, e&pteFrame, 3, limit, set); err != nil {
				return nil, err
			}
		}
	}
	return set, nil
}
