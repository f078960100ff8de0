package imagevm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/hpcvm/hpcvm/images"
)

// fileStamp identifies a file's contents cheaply: a rewritten or replaced
// file changes size, mtime or inode.
type fileStamp struct {
	Name    string `json:"name"`
	Size    int64  `json:"size"`
	MtimeNS int64  `json:"mtime_ns"`
	Inode   uint64 `json:"inode"`
}

type verifiedStamp struct {
	Image    string      `json:"image"`
	BuildKey string      `json:"build_key"`
	Files    []fileStamp `json:"files"`
}

// verifyImage checks the image's artifacts against its manifest. A full
// checksum of a multi-GiB disk costs seconds, so a successful verification
// is remembered (per user, in the cache directory) together with each
// file's size, mtime and inode, and redone only when one of them changes.
func verifyImage(ctx context.Context, st *images.Store, m *images.Manifest) error {
	stamp, err := currentStamp(st, m)
	if err != nil {
		return err
	}
	path := stampPath(st, m.Name)
	if b, err := os.ReadFile(path); err == nil {
		var old verifiedStamp
		if json.Unmarshal(b, &old) == nil && sameStamp(old, stamp) {
			return nil
		}
	}
	// Store.Verify returns an error as well as the results when an
	// artifact differs: name the artifact rather than only counting.
	res, err := st.Verify(ctx, m.Name)
	for _, r := range res {
		if !r.OK() {
			why := ""
			if r.Err != nil {
				why = ": " + r.Err.Error()
			}
			return fmt.Errorf("image %s: %s does not match its manifest%s (%w); rebuild it with hpcvm image build", m.Name, r.Artifact.Name, why, images.ErrCorrupt)
		}
	}
	if err != nil {
		return err
	}
	if b, err := json.Marshal(stamp); err == nil && os.MkdirAll(filepath.Dir(path), 0o700) == nil {
		tmp := path + ".tmp"
		if os.WriteFile(tmp, b, 0o600) == nil {
			os.Rename(tmp, path)
		}
	}
	return nil
}

func currentStamp(st *images.Store, m *images.Manifest) (verifiedStamp, error) {
	s := verifiedStamp{Image: m.Name, BuildKey: m.BuildKey}
	for _, a := range m.Artifacts {
		fi, err := os.Stat(st.Path(m.Name, a.Name))
		if err != nil {
			return s, fmt.Errorf("image %s: %w", m.Name, err)
		}
		fs := fileStamp{Name: a.Name, Size: fi.Size(), MtimeNS: fi.ModTime().UnixNano()}
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
			fs.Inode = sys.Ino
		}
		s.Files = append(s.Files, fs)
	}
	return s, nil
}

func sameStamp(a, b verifiedStamp) bool {
	if a.Image != b.Image || a.BuildKey != b.BuildKey || len(a.Files) != len(b.Files) {
		return false
	}
	for i := range a.Files {
		if a.Files[i] != b.Files[i] {
			return false
		}
	}
	return true
}

func stampPath(st *images.Store, name string) string {
	dir, err := os.UserCacheDir()
	if err != nil {
		dir = os.TempDir()
	}
	h := sha256.Sum256([]byte(st.Dir))
	return filepath.Join(dir, "hpcvm", "verified", hex.EncodeToString(h[:6])+"-"+name+".json")
}
