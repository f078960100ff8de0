package images

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// stageFake writes fake artifacts into a staging directory.
func stageFake(t *testing.T, st *Staging, content string) {
	t.Helper()
	for _, a := range []string{DiskFile, KernelFile, InitrdFile} {
		if err := os.WriteFile(filepath.Join(st.Dir(), a), []byte(a+":"+content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func publishFake(t *testing.T, s *Store, name, content string) *Manifest {
	t.Helper()
	st, err := s.Begin(name)
	if err != nil {
		t.Fatal(err)
	}
	stageFake(t, st, content)
	m := &Manifest{Version: content, Cmdline: "root=/dev/vda"}
	if err := st.Commit(context.Background(), m, DiskFile, KernelFile, InitrdFile); err != nil {
		t.Fatal(err)
	}
	return m
}

// storeEntries lists the store directory, ignoring lock files.
func storeEntries(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".lock") {
			out = append(out, e.Name())
		}
	}
	return out
}

func TestStorePublishGetListVerifyRemove(t *testing.T) {
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	publishFake(t, s, "b", "v1")
	publishFake(t, s, "a", "v1")
	ms, err := s.List()
	if err != nil || len(ms) != 2 || ms[0].Name != "a" || ms[1].Name != "b" {
		t.Fatalf("List: %v %+v", err, ms)
	}
	m, err := s.Get("a")
	if err != nil {
		t.Fatal(err)
	}
	if m.Schema != ManifestSchema || len(m.Artifacts) != 3 || m.Artifacts[0].Size != int64(len(DiskFile+":v1")) {
		t.Fatalf("manifest %+v", m)
	}
	if _, err := s.Verify(context.Background(), "a"); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	// Flip a byte of the kernel: verify names it.
	if err := os.WriteFile(s.Path("a", KernelFile), []byte("vmlinuz:v2"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := s.Verify(context.Background(), "a")
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Verify after corruption: %v, want ErrCorrupt", err)
	}
	for _, r := range res {
		if r.OK() == (r.Artifact.Name == KernelFile) {
			t.Errorf("%s: OK=%v", r.Artifact.Name, r.OK())
		}
	}
	if err := s.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Remove: %v, want ErrNotFound", err)
	}
	if err := s.Remove("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Remove: %v, want ErrNotFound", err)
	}
	if got := storeEntries(t, s); len(got) != 1 || got[0] != "b" {
		t.Fatalf("store holds %v, want [b]", got)
	}
}

func TestStoreReplace(t *testing.T) {
	s, _ := OpenStore(t.TempDir())
	publishFake(t, s, "img", "v1")
	publishFake(t, s, "img", "v2")
	m, err := s.Get("img")
	if err != nil || m.Version != "v2" {
		t.Fatalf("after replace: %v %+v", err, m)
	}
	b, _ := os.ReadFile(s.Path("img", DiskFile))
	if string(b) != DiskFile+":v2" {
		t.Fatalf("disk holds %q", b)
	}
	if got := storeEntries(t, s); len(got) != 1 {
		t.Fatalf("store holds %v, want only img", got)
	}
}

func TestStoreAbortLeavesOldImage(t *testing.T) {
	s, _ := OpenStore(t.TempDir())
	publishFake(t, s, "img", "v1")
	st, err := s.Begin("img")
	if err != nil {
		t.Fatal(err)
	}
	stageFake(t, st, "v2")
	if _, err := s.Begin("img"); !errors.Is(err, ErrBusy) {
		t.Fatalf("concurrent Begin: %v, want ErrBusy", err)
	}
	if err := s.Remove("img"); !errors.Is(err, ErrBusy) {
		t.Fatalf("Remove during a build: %v, want ErrBusy", err)
	}
	if err := st.Abort(); err != nil {
		t.Fatal(err)
	}
	if m, err := s.Get("img"); err != nil || m.Version != "v1" {
		t.Fatalf("after abort: %v %+v", err, m)
	}
	if got := storeEntries(t, s); len(got) != 1 {
		t.Fatalf("store holds %v after abort", got)
	}
}

func TestStoreCleansLeftovers(t *testing.T) {
	s, _ := OpenStore(t.TempDir())
	publishFake(t, s, "img", "v1")
	// What a SIGKILLed build or removal leaves; img-2's belong to another image.
	for _, d := range []string{".tmp-img-0123abcd", ".old-img-4567ef01", ".tmp-img-2-89abcdef"} {
		if err := os.MkdirAll(filepath.Join(s.Dir, d, "rootfs"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if ms, err := s.List(); err != nil || len(ms) != 1 {
		t.Fatalf("List with leftovers: %v %d", err, len(ms))
	}
	st, err := s.Begin("img")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Abort()
	got := storeEntries(t, s)
	want := map[string]bool{"img": true, filepath.Base(st.Dir()): true, ".tmp-img-2-89abcdef": true}
	if len(got) != len(want) {
		t.Fatalf("store holds %v, want %v", got, want)
	}
	for _, g := range got {
		if !want[g] {
			t.Fatalf("store holds %v, want %v", got, want)
		}
	}
}

func TestStoreRejectsBadNames(t *testing.T) {
	s, _ := OpenStore(t.TempDir())
	for _, n := range []string{"", "..", "../x", "a/b", ".tmp-x", "UPPER"} {
		if _, err := s.Begin(n); err == nil {
			t.Errorf("Begin(%q) accepted", n)
		}
		if _, err := s.Get(n); err == nil {
			t.Errorf("Get(%q) accepted", n)
		}
	}
}

func TestSafeRemoveAllRefusesMounts(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	// Mount in a throwaway path and check the refusal, then unmount.
	dir := t.TempDir()
	sub := filepath.Join(dir, "rootfs", "dev")
	os.MkdirAll(sub, 0o755)
	if err := mountTmpfs(sub); err != nil {
		t.Skipf("cannot mount tmpfs here: %v", err)
	}
	defer unmount(sub)
	if err := safeRemoveAll(dir); err == nil || !strings.Contains(err.Error(), "still mounted") {
		t.Fatalf("safeRemoveAll with a mount inside: %v", err)
	}
	if _, err := os.Stat(sub); err != nil {
		t.Fatalf("mounted dir was touched: %v", err)
	}
}

func TestUnescapeMount(t *testing.T) {
	tests := map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/x\0`: `/x\0`, `/t\011`: "/t\t"}
	for in, want := range tests {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}
