package virtio

import (
	"errors"
	"fmt"
	"io"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// ErrShortChain is returned when a chain's buffers are too small for what a
// device needs to read or write.
var ErrShortChain = errors.New("virtio: descriptor chain too short")

// ChainReader reads a chain's device-readable buffers as one byte stream.
type ChainReader struct {
	mem   memory.Guest
	descs []Desc
	off   uint32 // into descs[0]
}

// Reader returns a reader over c's device-readable buffers.
func (c *Chain) Reader(mem memory.Guest) *ChainReader {
	r := &ChainReader{mem: mem}
	for _, d := range c.Descs {
		if !d.Write && d.Len > 0 {
			r.descs = append(r.descs, d)
		}
	}
	return r
}

// Remaining is the number of unread bytes.
func (r *ChainReader) Remaining() uint64 {
	var n uint64
	for _, d := range r.descs {
		n += uint64(d.Len)
	}
	return n - uint64(r.off)
}

// Read implements io.Reader. Guest-memory errors are returned wrapped.
func (r *ChainReader) Read(p []byte) (int, error) {
	done := 0
	for done < len(p) && len(r.descs) > 0 {
		d := r.descs[0]
		n := min(uint64(len(p)-done), uint64(d.Len-r.off))
		at := d.Addr + uint64(r.off)
		if _, err := r.mem.ReadAt(p[done:done+int(n)], int64(at)); err != nil {
			return done, fmt.Errorf("virtio: read guest buffer at %#x: %w", at, err)
		}
		done += int(n)
		r.off += uint32(n)
		if r.off == d.Len {
			r.descs, r.off = r.descs[1:], 0
		}
	}
	if done == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return done, nil
}

// ReadFull fills p or fails with ErrShortChain.
func (r *ChainReader) ReadFull(p []byte) error {
	if r.Remaining() < uint64(len(p)) {
		return fmt.Errorf("%w: need %d readable bytes, have %d", ErrShortChain, len(p), r.Remaining())
	}
	_, err := io.ReadFull(r, p)
	return err
}

// ChainWriter writes a chain's device-writable buffers as one byte stream.
type ChainWriter struct {
	mem     memory.Guest
	descs   []Desc
	off     uint32
	written uint32
}

// Writer returns a writer over c's device-writable buffers.
func (c *Chain) Writer(mem memory.Guest) *ChainWriter {
	w := &ChainWriter{mem: mem}
	for _, d := range c.Descs {
		if d.Write && d.Len > 0 {
			w.descs = append(w.descs, d)
		}
	}
	return w
}

// Remaining is the number of bytes that can still be written.
func (w *ChainWriter) Remaining() uint64 {
	var n uint64
	for _, d := range w.descs {
		n += uint64(d.Len)
	}
	return n - uint64(w.off)
}

// Written is the number of bytes written so far (the used-ring length).
func (w *ChainWriter) Written() uint32 { return w.written }

// Write implements io.Writer; writing past the end fails with ErrShortChain
// after filling what fits.
func (w *ChainWriter) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) && len(w.descs) > 0 {
		d := w.descs[0]
		n := min(uint64(len(p)-done), uint64(d.Len-w.off))
		at := d.Addr + uint64(w.off)
		if _, err := w.mem.WriteAt(p[done:done+int(n)], int64(at)); err != nil {
			return done, fmt.Errorf("virtio: write guest buffer at %#x: %w", at, err)
		}
		done += int(n)
		w.off += uint32(n)
		w.written += uint32(n)
		if w.off == d.Len {
			w.descs, w.off = w.descs[1:], 0
		}
	}
	if done < len(p) {
		return done, fmt.Errorf("%w: %d bytes did not fit", ErrShortChain, len(p)-done)
	}
	return done, nil
}
