package blk

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
)

// TestCOWNeverWritesBase writes at unaligned offsets spanning blocks and
// checks reads see the writes, unwritten bytes still come from the base,
// and the base file is unchanged.
func TestCOWNeverWritesBase(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	orig := make([]byte, 5*cowBlock+1000)
	rand.Read(orig)
	if err := os.WriteFile(base, orig, 0o444); err != nil {
		t.Fatal(err)
	}
	c, err := openCOW(base, filepath.Join(dir, "over.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	want := append([]byte(nil), orig...)
	for _, w := range []struct {
		off int64
		n   int
	}{{10, 20}, {cowBlock - 5, 10}, {2 * cowBlock, cowBlock}, {3*cowBlock + 100, 2 * cowBlock}, {int64(len(orig)) - 7, 7}} {
		data := make([]byte, w.n)
		rand.Read(data)
		if _, err := c.WriteAt(data, w.off); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", w.off, w.n, err)
		}
		copy(want[w.off:], data)
	}
	got := make([]byte, len(orig))
	if n, err := c.ReadAt(got, 0); err != nil || n != len(got) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("copy-on-write view differs from the expected contents")
	}
	part := make([]byte, 333)
	if _, err := c.ReadAt(part, cowBlock-100); err != nil || !bytes.Equal(part, want[cowBlock-100:cowBlock+233]) {
		t.Fatalf("unaligned read across blocks: %v", err)
	}
	if after, _ := os.ReadFile(base); !bytes.Equal(after, orig) {
		t.Fatal("the base image was modified")
	}
	if _, err := c.WriteAt([]byte{1}, int64(len(orig))); err == nil {
		t.Fatal("write past the end accepted")
	}
	if _, err := openCOW(base, filepath.Join(dir, "over.raw")); err == nil {
		t.Fatal("an existing overlay file was reused")
	}
}
