// Package blk is a virtio-blk device backed by a raw disk image file.
package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
)

// Feature bits (virtio 1.x §5.2.3).
const (
	FeatureSizeMax = 1 << 1
	FeatureSegMax  = 1 << 2
	FeatureRO      = 1 << 5
	FeatureBlkSize = 1 << 6
	FeatureFlush   = 1 << 9
)

// Request types and status codes (virtio 1.x §5.2.6).
const (
	TypeIn    = 0
	TypeOut   = 1
	TypeFlush = 4
	TypeGetID = 8

	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

const (
	SectorSize = 512
	// IDLen is the size of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
	IDLen = 20
	// HeaderLen is the size of struct virtio_blk_req's header.
	HeaderLen = 16

	queueSize = 256
	// sizeMax bounds one guest segment; it also bounds our bounce buffer.
	sizeMax = 1 << 20
	// A request has a header and a status descriptor besides data.
	segMax = queueSize - 2
)

// Config describes a disk.
type Config struct {
	// Path is the raw image file.
	Path string
	// ReadOnly opens the file O_RDONLY and offers VIRTIO_BLK_F_RO.
	ReadOnly bool
	// Overlay, if set, makes the disk copy-on-write: Path is opened
	// read-only and never modified, and the guest's writes go to this new
	// sparse file (which must not exist). The caller removes it.
	Overlay string
	// ID is the serial returned by GET_ID (at most IDLen bytes).
	ID  string
	Log *slog.Logger
}

// Blk is a virtio-blk device. Wrap it with virtio.NewMMIO.
type Blk struct {
	cfg      Config
	file     backend
	capacity uint64 // sectors
	log      *slog.Logger

	mu  sync.Mutex
	env *virtio.Env
	w   *virtio.Worker
	buf []byte
}

var _ virtio.Device = (*Blk)(nil)

// New opens the disk image.
func New(cfg Config) (*Blk, error) {
	if len(cfg.ID) > IDLen {
		return nil, fmt.Errorf("virtio-blk %s: serial %q longer than %d bytes", cfg.Path, cfg.ID, IDLen)
	}
	if cfg.Overlay != "" && cfg.ReadOnly {
		return nil, fmt.Errorf("virtio-blk %s: a read-only disk needs no overlay", cfg.Path)
	}
	flag := os.O_RDWR
	if cfg.ReadOnly || cfg.Overlay != "" {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(cfg.Path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("virtio-blk: open disk image: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("virtio-blk: stat disk image: %w", err)
	}
	var file backend = f
	if cfg.Overlay != "" {
		f.Close()
		if file, err = openCOW(cfg.Path, cfg.Overlay); err != nil {
			return nil, err
		}
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	log = log.With("disk", cfg.Path)
	if fi.Size()%SectorSize != 0 {
		log.Warn("virtio-blk: image size is not a multiple of 512; the tail is not visible to the guest", "size", fi.Size())
	}
	return &Blk{cfg: cfg, file: file, capacity: uint64(fi.Size()) / SectorSize, log: log}, nil
}

// Capacity is the disk size in 512-byte sectors.
func (b *Blk) Capacity() uint64 { return b.capacity }

// Type implements virtio.Device.
func (b *Blk) Type() uint32 { return virtio.IDBlock }

// Features implements virtio.Device.
func (b *Blk) Features() uint64 {
	f := uint64(FeatureSizeMax | FeatureSegMax | FeatureBlkSize | FeatureFlush)
	if b.cfg.ReadOnly {
		f |= FeatureRO
	}
	return f
}

// QueueMaxSizes implements virtio.Device: one request queue.
func (b *Blk) QueueMaxSizes() []uint16 { return []uint16{queueSize} }

// config is struct virtio_blk_config up to blk_size.
func (b *Blk) config() []byte {
	c := make([]byte, 24)
	binary.LittleEndian.PutUint64(c[0:], b.capacity)
	binary.LittleEndian.PutUint32(c[8:], sizeMax)
	binary.LittleEndian.PutUint32(c[12:], segMax)
	// c[16:20] geometry stays zero.
	binary.LittleEndian.PutUint32(c[20:], SectorSize)
	return c
}

// ReadConfig implements virtio.Device.
func (b *Blk) ReadConfig(off uint64, data []byte) {
	clear(data)
	if c := b.config(); off < uint64(len(c)) {
		copy(data, c[off:])
	}
}

// WriteConfig implements virtio.Device; the config space is read-only here
// (no writeback toggle).
func (b *Blk) WriteConfig(off uint64, data []byte) {
	b.log.Debug("virtio-blk: ignoring config write", "offset", off)
}

// Activate implements virtio.Device.
func (b *Blk) Activate(env *virtio.Env) error {
	if env.Queues[0] == nil {
		return errors.New("virtio-blk: request queue not enabled")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.env = env
	b.w = virtio.StartWorker(b.process)
	// After a restore, requests may already be waiting without a new kick.
	b.w.Kick()
	return nil
}

// Notify implements virtio.Device.
func (b *Blk) Notify(int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w != nil {
		b.w.Kick()
	}
}

// Reset implements virtio.Device.
func (b *Blk) Reset() {
	b.mu.Lock()
	w := b.w
	b.w, b.env = nil, nil
	b.mu.Unlock()
	if w != nil {
		w.Stop()
	}
}

// Close implements virtio.Device.
func (b *Blk) Close() error {
	b.Reset()
	return b.file.Close()
}

// process drains the request queue; it runs on the worker goroutine.
func (b *Blk) process() {
	b.mu.Lock()
	env := b.env
	b.mu.Unlock()
	if env == nil || env.Failed() {
		return
	}
	q := env.Queues[0]
	did := false
	for {
		c, err := q.Pop()
		if err != nil {
			env.Fail(err)
			return
		}
		if c == nil {
			break
		}
		n, err := b.handle(env, c)
		if err != nil {
			env.Fail(err)
			return
		}
		if err := q.PushUsed(c.Head, n); err != nil {
			env.Fail(err)
			return
		}
		did = true
	}
	if did {
		q.Signal()
	}
}

// Header is the parsed virtio_blk_req header.
type Header struct {
	Type   uint32
	Sector uint64
}

// ParseHeader decodes the 16-byte request header.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("virtio-blk: request header is %d bytes, want %d", len(b), HeaderLen)
	}
	return Header{Type: binary.LittleEndian.Uint32(b[0:]), Sector: binary.LittleEndian.Uint64(b[8:])}, nil
}

// handle executes one request and returns the used length. An error means
// the chain was unusable (guest memory fault); I/O failures on the image
// are reported to the guest as VIRTIO_BLK_S_IOERR instead.
func (b *Blk) handle(env *virtio.Env, c *virtio.Chain) (uint32, error) {
	readable, writable := c.Lens()
	if writable == 0 {
		// No room for a status byte: nothing can be reported back.
		b.log.Warn("virtio-blk: request without a writable status byte dropped", "head", c.Head)
		return 0, nil
	}
	r := c.Reader(env.Mem)
	w := c.Writer(env.Mem)
	var hb [HeaderLen]byte
	if readable < HeaderLen {
		b.log.Warn("virtio-blk: request shorter than its header", "readable", readable)
		return b.status(w, writable, StatusIOErr)
	}
	if err := r.ReadFull(hb[:]); err != nil {
		return 0, err
	}
	h, _ := ParseHeader(hb[:])
	dataIn := writable - 1 // bytes of data the device writes before status
	switch h.Type {
	case TypeIn:
		if st := b.check(h, dataIn); st != StatusOK {
			return b.status(w, writable, st)
		}
		off := int64(h.Sector * SectorSize)
		for left := dataIn; left > 0; {
			chunk := b.bounce(left)
			got, err := b.file.ReadAt(chunk, off)
			if err != nil && !errors.Is(err, io.EOF) {
				b.log.Error("virtio-blk: read from image failed", "sector", h.Sector, "err", err)
				return b.status(w, writable, StatusIOErr)
			}
			clear(chunk[got:]) // the image shrank under us: read zeros
			if _, err := w.Write(chunk); err != nil {
				return 0, err
			}
			off += int64(len(chunk))
			left -= uint64(len(chunk))
		}
		return b.status(w, writable, StatusOK)
	case TypeOut:
		n := r.Remaining()
		if b.cfg.ReadOnly {
			return b.status(w, writable, StatusIOErr)
		}
		if st := b.check(h, n); st != StatusOK {
			return b.status(w, writable, st)
		}
		off := int64(h.Sector * SectorSize)
		for left := n; left > 0; {
			chunk := b.bounce(left)
			if err := r.ReadFull(chunk); err != nil {
				return 0, err
			}
			if _, err := b.file.WriteAt(chunk, off); err != nil {
				b.log.Error("virtio-blk: write to image failed", "sector", h.Sector, "err", err)
				return b.status(w, writable, StatusIOErr)
			}
			off += int64(len(chunk))
			left -= uint64(len(chunk))
		}
		return b.status(w, writable, StatusOK)
	case TypeFlush:
		if !b.cfg.ReadOnly {
			if err := b.file.Sync(); err != nil {
				b.log.Error("virtio-blk: fsync failed", "err", err)
				return b.status(w, writable, StatusIOErr)
			}
		}
		return b.status(w, writable, StatusOK)
	case TypeGetID:
		id := make([]byte, min(IDLen, dataIn))
		copy(id, b.cfg.ID)
		if _, err := w.Write(id); err != nil {
			return 0, err
		}
		// Skip any remaining data space so status lands in the last byte.
		return b.status(w, writable, StatusOK)
	default:
		return b.status(w, writable, StatusUnsupp)
	}
}

// check validates a data transfer of n bytes at h.Sector.
func (b *Blk) check(h Header, n uint64) byte {
	if n%SectorSize != 0 {
		b.log.Warn("virtio-blk: transfer length is not a whole number of sectors", "len", n)
		return StatusIOErr
	}
	end := h.Sector + n/SectorSize
	if h.Sector > b.capacity || end > b.capacity || end < h.Sector {
		b.log.Warn("virtio-blk: access beyond end of disk", "sector", h.Sector, "sectors", n/SectorSize, "capacity", b.capacity)
		return StatusIOErr
	}
	return StatusOK
}

// bounce returns a reusable buffer of min(n, sizeMax) bytes.
func (b *Blk) bounce(n uint64) []byte {
	if b.buf == nil {
		b.buf = make([]byte, sizeMax)
	}
	return b.buf[:min(n, sizeMax)]
}

// status writes st into the chain's last writable byte and returns the
// used length (the whole writable area counts as written up to status).
func (b *Blk) status(w *virtio.ChainWriter, writable uint64, st byte) (uint32, error) {
	if pad := writable - 1 - uint64(w.Written()); pad > 0 {
		// Data not produced (errors, short GET_ID): fill so the status byte
		// is the last one, as the driver expects it there.
		if _, err := w.Write(make([]byte, pad)); err != nil {
			return 0, err
		}
	}
	if _, err := w.Write([]byte{st}); err != nil {
		return 0, err
	}
	return w.Written(), nil
}

// StateVersion is the current version of State.
const StateVersion = 1

// State is virtio-blk's device state (version 1). Queue state belongs to
// the transport (virtio.State); the disk contents live in the image file.
type State struct {
	Version  uint32
	Capacity uint64 // sectors; must match the image on restore
	ReadOnly bool
	ID       string
}

// State returns the device state.
func (b *Blk) State() State {
	return State{Version: StateVersion, Capacity: b.capacity, ReadOnly: b.cfg.ReadOnly, ID: b.cfg.ID}
}

// Restore checks that s describes this disk; there is nothing else to load.
func (b *Blk) Restore(s State) error {
	switch {
	case s.Version != StateVersion:
		return fmt.Errorf("virtio-blk state version %d, want %d", s.Version, StateVersion)
	case s.Capacity != b.capacity:
		return fmt.Errorf("virtio-blk restore: image %s has %d sectors, snapshot had %d", b.cfg.Path, b.capacity, s.Capacity)
	case s.ReadOnly != b.cfg.ReadOnly:
		return fmt.Errorf("virtio-blk restore: image %s read-only=%v, snapshot had %v", b.cfg.Path, b.cfg.ReadOnly, s.ReadOnly)
	case s.ID != b.cfg.ID:
		return fmt.Errorf("virtio-blk restore: serial %q, snapshot had %q", b.cfg.ID, s.ID)
	}
	return nil
}
