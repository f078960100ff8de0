package dsm

import (
	"encoding/binary"
	"fmt"
)

// DescribeAddr tells, for the stop-time report, where a guest-virtual
// address va of a vCPU whose CR3 is cr3 lives and this slice's copy of it:
// "gpa=0x... replica word=0x..." (word: the 8 bytes at va, if the page is
// here). A hung guest spinning on a lock names the lock's address in a
// register; its page's state on every slice says whether the slices agree
// on the lock word (a lost write) or the lock is simply held.
//
// It reads only pages this slice holds (never faults: the machine is
// stopping and the peers may be gone); a walk through a page that is not
// here says so.
func (nd *Node) DescribeAddr(cr3, va uint64) string {
	gpa, err := nd.translateLocal(cr3, va)
	if err != nil {
		return err.Error()
	}
	idx, host, ok := nd.locate(gpa)
	if !ok {
		return fmt.Sprintf("gpa=%#x (not RAM)", gpa)
	}
	p := &nd.pages[idx]
	p.mu.Lock()
	defer p.mu.Unlock()
	s := fmt.Sprintf("gpa=%#x %s", gpa, p.st)
	if p.st != invalid && p.mapped && len(host) >= 8 {
		s += fmt.Sprintf(" word=%#x", binary.LittleEndian.Uint64(host[:8]))
	}
	return s
}

// readLocalWord reads the 8-byte word at gpa if this slice holds its page
// (mapped): page-table pages of the kernel are replicas on every slice.
func (nd *Node) readLocalWord(gpa uint64) (uint64, error) {
	idx, host, ok := nd.locate(gpa)
	if !ok {
		return 0, fmt.Errorf("table at gpa %#x is not RAM", gpa)
	}
	p := &nd.pages[idx]
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.st == invalid || !p.mapped {
		return 0, fmt.Errorf("table page %#x is not on this slice (%s)", gpa&^(PageSize-1), p.st)
	}
	return binary.LittleEndian.Uint64(host[:8]), nil
}

// translateLocal walks the 4-level tables rooted at cr3 for va, reading
// only this slice's copies.
func (nd *Node) translateLocal(cr3, va uint64) (uint64, error) {
	table := cr3 & pteFrame
	for level := 4; level >= 1; level-- {
		shift := uint(12 + 9*(level-1))
		i := (va >> shift) & 511
		e, err := nd.readLocalWord(table + 8*i)
		if err != nil {
			return 0, fmt.Errorf("va %#x: %v", va, err)
		}
		if e&ptePresent == 0 {
			return 0, fmt.Errorf("va %#x: not mapped (level %d entry %#x)", va, level, e)
		}
		const huge = 1 << 7
		if level == 1 || level <= 3 && e&huge != 0 {
			mask := uint64(1)<<shift - 1
			return (e&pteFrame)&^mask | va&mask, nil
		}
		table = e & pteFrame
	}
	panic("unreachable")
}
