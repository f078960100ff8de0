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

// kernelTablePages returns a Linux guest's kernel page tables, read from
// the address space rooted at cr3: every table under the kernel half
// (PML4 entries 256-511: the image's own static tables, the direct map's,
// vmemmap's, vmalloc's and the fixmap's, which every process shares), and
// the root itself if it is the kernel's own (init_top_pgt: it lies inside
// the kernel image, whose extent is read off the kernel mapping, PML4
// entry 511 -> PDPT entry 510; after boot Linux splits some of the image's
// 2 MiB pages into 4 KiB ones, so both are looked at). A process's root is
// left out: processes' tables are freed and reused as data. At most limit
// pages. Linux never frees the kernel half's tables in practice; publish
// stops the VM if the guest unlinks one anyway. It returns nothing for an
// address space without the kernel mapping.
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
	mapped, inImage := false, false
	for i := 0; i < wordsPerPage && !inImage; i++ {
		if e, err = entry(pd, i); err != nil {
			return nil, err
		}
		switch {
		case e&ptePresent == 0:
			continue
		case e&huge != 0:
			inImage = e&hugeFrame == root&hugeFrame
		default: // split into 4 KiB pages: the entry for root's offset
			var pte uint64
			if pte, err = entry(e&pteFrame, int(root/PageSize)%wordsPerPage); err != nil {
				return nil, nil // the table is not in RAM: not a kernel mapping
			}
			inImage = pte&ptePresent != 0 && pte&pteFrame == root
		}
		mapped = true
	}
	if !mapped {
		return nil, nil // no kernel image mapped: not a Linux kernel's tables
	}
	set := TableSet{}
	if inImage {
		set[root/PageSize] = 4
	}
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
