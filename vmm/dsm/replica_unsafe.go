package dsm

import (
	"sync/atomic"
	"unsafe"
)

// Guest page-table words are read and updated with 8-byte atomic
// operations: on a replica the slice's own processor (its page walker
// setting accessed/dirty bits) writes the same words concurrently.

func wordPtr(page []byte, w int) *uint64 {
	_ = page[8*w+7]
	return (*uint64)(unsafe.Pointer(&page[8*w]))
}

// loadWord atomically reads word w of a page-aligned host page.
func loadWord(page []byte, w int) uint64 { return atomic.LoadUint64(wordPtr(page, w)) }

// casWord atomically replaces word w of page if it still holds old.
func casWord(page []byte, w int, old, new uint64) bool {
	return atomic.CompareAndSwapUint64(wordPtr(page, w), old, new)
}
