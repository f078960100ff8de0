package blk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// backend is where a disk's sectors live: the image file itself, or a
// copy-on-write view of it.
type backend interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Close() error
}

// cowBlock is the copy-on-write granularity.
const cowBlock = 4096

// cowFile is a copy-on-write view of a read-only base image: the guest's
// writes go to a sparse overlay file and the base is never modified, so one
// published image can back any number of VMs without being copied. Which
// blocks the overlay holds is kept in memory: the overlay is scratch space
// for one VM's lifetime.
type cowFile struct {
	base, over *os.File
	size       int64

	mu      sync.Mutex
	present []uint64 // bit per cowBlock: the overlay has this block
}

// openCOW opens base read-only and creates overlay (which must not exist)
// as a sparse file of the same size.
func openCOW(base, overlay string) (*cowFile, error) {
	b, err := os.Open(base)
	if err != nil {
		return nil, fmt.Errorf("virtio-blk: open base image: %w", err)
	}
	fi, err := b.Stat()
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("virtio-blk: stat base image: %w", err)
	}
	o, err := os.OpenFile(overlay, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("virtio-blk: create overlay: %w", err)
	}
	if err := o.Truncate(fi.Size()); err != nil {
		b.Close()
		o.Close()
		return nil, fmt.Errorf("virtio-blk: size overlay: %w", err)
	}
	nblocks := (fi.Size() + cowBlock - 1) / cowBlock
	return &cowFile{base: b, over: o, size: fi.Size(), present: make([]uint64, (nblocks+63)/64)}, nil
}

func (c *cowFile) has(blk int64) bool { return c.present[blk/64]&(1<<(blk%64)) != 0 }
func (c *cowFile) mark(blk int64)     { c.present[blk/64] |= 1 << (blk % 64) }

// ReadAt reads each block from the overlay if written there, else the base.
func (c *cowFile) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		if pos >= c.size {
			return done, io.EOF
		}
		blk := pos / cowBlock
		n := min(int64(len(p)-done), (blk+1)*cowBlock-pos, c.size-pos)
		src := c.base
		if c.has(blk) {
			src = c.over
		}
		got, err := src.ReadAt(p[done:done+int(n)], pos)
		done += got
		if err != nil && !(errors.Is(err, io.EOF) && int64(got) == n) {
			return done, err
		}
	}
	return done, nil
}

// WriteAt writes into the overlay, first copying in the rest of any block
// it only partly covers.
func (c *cowFile) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if off+int64(len(p)) > c.size {
		return 0, fmt.Errorf("virtio-blk: write at %d+%d past the end of the disk (%d bytes)", off, len(p), c.size)
	}
	done := 0
	var blockBuf []byte
	for done < len(p) {
		pos := off + int64(done)
		blk := pos / cowBlock
		start := blk * cowBlock
		n := min(int64(len(p)-done), start+cowBlock-pos)
		if !c.has(blk) && n < cowBlock {
			end := min(start+cowBlock, c.size)
			if blockBuf == nil {
				blockBuf = make([]byte, cowBlock)
			}
			b := blockBuf[:end-start]
			if _, err := c.base.ReadAt(b, start); err != nil && !errors.Is(err, io.EOF) {
				return done, err
			}
			copy(b[pos-start:], p[done:done+int(n)])
			if _, err := c.over.WriteAt(b, start); err != nil {
				return done, err
			}
		} else if _, err := c.over.WriteAt(p[done:done+int(n)], pos); err != nil {
			return done, err
		}
		c.mark(blk)
		done += int(n)
	}
	return done, nil
}

// Sync flushes the overlay (the base is never written).
func (c *cowFile) Sync() error { return c.over.Sync() }

// Close closes both files. The overlay file stays on disk for the caller
// to remove (or inspect).
func (c *cowFile) Close() error {
	return errors.Join(c.base.Close(), c.over.Close())
}
