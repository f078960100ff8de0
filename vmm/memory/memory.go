// Package memory provides guest physical memory: the interface every device
// and loader uses to touch guest RAM, and the single-node implementation
// backed by private anonymous mappings.
//
// Devices must access guest memory only through Guest so that, in distributed
// mode, the same device code goes through the page-coherence protocol.
package memory

import "io"

// PageSize is the granularity of guest memory mapping and coherence.
const PageSize = 4096

// Guest is guest physical memory as seen by the VMM.
// Offsets passed to ReadAt and WriteAt are guest-physical addresses.
// An access that touches an address outside guest RAM returns an error and
// transfers nothing past the hole.
type Guest interface {
	io.ReaderAt
	io.WriterAt
	// Size is the amount of guest RAM in bytes (holes excluded).
	Size() uint64
}
