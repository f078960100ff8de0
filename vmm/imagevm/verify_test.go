package imagevm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/images"
)

// fakeImage publishes an image with small artifacts straight into a store.
func fakeImage(t *testing.T, st *images.Store, name string) *images.Manifest {
	t.Helper()
	if err := os.MkdirAll(st.Path(name, ""), 0o755); err != nil {
		t.Fatal(err)
	}
	m := &images.Manifest{Schema: images.ManifestSchema, Name: name, BuildKey: "k1", Created: time.Now()}
	for _, f := range []string{images.DiskFile, images.KernelFile, images.InitrdFile} {
		data := []byte("contents of " + f)
		if err := os.WriteFile(st.Path(name, f), data, 0o644); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		m.Artifacts = append(m.Artifacts, images.Artifact{Name: f, Size: int64(len(data)), SHA256: hex.EncodeToString(sum[:])})
	}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(st.Path(name, images.ManifestFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestVerifyImageRefusesCorruption(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	st, err := images.OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m := fakeImage(t, st, "img")
	ctx := context.Background()
	if err := verifyImage(ctx, st, m); err != nil {
		t.Fatalf("intact image refused: %v", err)
	}
	if _, err := os.Stat(stampPath(st, "img")); err != nil {
		t.Fatalf("no verification stamp written: %v", err)
	}
	// Same size, other bytes: the stamp no longer matches (mtime), so the
	// checksum is recomputed and the image refused.
	time.Sleep(10 * time.Millisecond)
	if err := os.WriteFile(st.Path("img", images.DiskFile), []byte("CONTENTS OF disk.raw"), 0o644); err != nil {
		t.Fatal(err)
	}
	err = verifyImage(ctx, st, m)
	if !errors.Is(err, images.ErrCorrupt) || !contains(err.Error(), "disk.raw does not match its manifest") {
		t.Fatalf("corrupted disk: err = %v, want ErrCorrupt naming disk.raw", err)
	}
}

func TestStartUnknownImageListsAvailable(t *testing.T) {
	st, err := images.OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fakeImage(t, st, "debian12")
	_, err = Start(context.Background(), Config{Store: st, Image: "centos7", CPUs: 1, MemBytes: 64 << 20, WorkDir: filepath.Join(t.TempDir())})
	if !errors.Is(err, ErrUnknownImage) || !contains(err.Error(), "debian12") {
		t.Fatalf("err = %v, want unknown image listing debian12", err)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
