package server

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

// copyIn receives a file into a temporary file beside its destination,
// fsyncs it, sets owner and mode, renames it in and fsyncs the directory.
func (s *Server) copyIn(log *slog.Logger, fr *proto.Reader, fw *frameWriter, r *proto.CopyIn) {
	size, sum, err := s.receive(fr, r)
	if err != nil {
		log.Warn("copy-in failed", "path", r.Path, "err", err)
		fw.fail(errCode(err), "copy-in %s: %v", r.Path, err)
		return
	}
	log.Info("copied in", "path", r.Path, "size", size, "mode", fmt.Sprintf("%#o", r.Mode))
	fw.msg(proto.TCopyDone, &proto.CopyDone{Size: size, SHA256: sum})
}

// drain reads and discards data frames up to TDataEnd, so a failed copy can
// still answer with an Error the host will read.
func drain(fr *proto.Reader) {
	for {
		f, err := fr.ReadFrame()
		if err != nil || f.Type != proto.TData {
			return
		}
	}
}

func (s *Server) receive(fr *proto.Reader, r *proto.CopyIn) (int64, string, error) {
	dir := filepath.Dir(r.Path)
	if r.MkdirAll {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			drain(fr)
			return 0, "", err
		}
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(r.Path)+".hpcvm-*")
	if err != nil {
		drain(fr)
		return 0, "", err
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	var size int64
	var werr error
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return 0, "", fmt.Errorf("reading data: %w", err)
		}
		if f.Type == proto.TDataEnd {
			break
		}
		if f.Type != proto.TData {
			return 0, "", fmt.Errorf("unexpected %s frame in file data", f.Type)
		}
		if werr == nil {
			_, werr = tmp.Write(f.Payload)
			h.Write(f.Payload)
			size += int64(len(f.Payload))
		}
	}
	if werr != nil {
		return 0, "", werr
	}
	if err := tmp.Sync(); err != nil {
		return 0, "", err
	}
	// chown before chmod: chown clears setuid/setgid bits.
	if err := tmp.Chown(int(r.UID), int(r.GID)); err != nil {
		return 0, "", err
	}
	if err := tmp.Chmod(os.FileMode(r.Mode&0o777) | modeBits(r.Mode)); err != nil {
		return 0, "", err
	}
	if err := tmp.Close(); err != nil {
		return 0, "", err
	}
	if err := os.Rename(tmp.Name(), r.Path); err != nil {
		return 0, "", err
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return size, hex.EncodeToString(h.Sum(nil)), nil
}

// modeBits converts the Unix setuid/setgid/sticky bits to Go's FileMode.
func modeBits(m uint32) os.FileMode {
	var fm os.FileMode
	if m&0o4000 != 0 {
		fm |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		fm |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		fm |= os.ModeSticky
	}
	return fm
}
