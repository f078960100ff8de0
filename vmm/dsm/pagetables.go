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
	return set, walkTables(mem, cr3&pteFrame, 4, limit, set)
}

// walkTables adds table (a page table of the given level, 4 = PML4) and
// every table under it to set, up to limit pages.
func walkTables(mem memory.Guest, table uint64, level, limit int, set map[uint64]bool) error {
	pfn := table / PageSize
	if set[pfn] || len(set) >= limit {
		return nil
	}
	if level == 1 {
		set[pfn] = true // a last-level table: its entries map pages
		return nil
	}
	buf := make([]byte, PageSize)
	if _, err := mem.ReadAt(buf, int64(table)); err != nil {
		return nil // not RAM: no table there
	}
	set[pfn] = true
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
	hugeFrame     = 0x000F_FFFF_FFE0_0000
)

// kernelTablePages returns the page tables of a Linux guest that live in
// its kernel image — the ones it builds into its .data (init_top_pgt,
// level3_kernel_pgt, level2_kernel_pgt, the fixmap tables) and never
// frees — among the root at cr3 and the tables under the kernel mapping.
// The image's extent is read off the kernel mapping itself. It returns
// nothing if cr3's address space has no such mapping.
func kernelTablePages(mem memory.Guest, cr3 uint64) (map[uint64]bool, error) {
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
	image := map[uint64]bool{} // 2 MiB frames of the image
	for i := 0; i < wordsPerPage; i++ {
		if e, err = entry(pd, i); err != nil {
			return nil, err
		}
		if e&ptePresent != 0 && e&huge != 0 {
			image[e&hugeFrame] = true
		}
	}
	inImage := func(gpa uint64) bool { return image[gpa&hugeFrame] }
	out := map[uint64]bool{}
	if inImage(root) {
		out[root/PageSize] = true
	}
	// The subtree under PML4 entry 511 (kernel text, modules, fixmap).
	e, _ = entry(root, kernelMapPML4)
	sub := map[uint64]bool{}
	walkFrom := e & pteFrame
	if err := walkTables(mem, walkFrom, 3, 64, sub); err != nil {
		return nil, err
	}
	for pfn := range sub {
		if inImage(pfn * PageSize) {
			out[pfn] = true
		}
	}
	return out, nil
}
