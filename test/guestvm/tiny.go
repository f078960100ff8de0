package guestvm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/images"
)

// tinyInit is PID 1 of the tiny image: mounts, then the agent, then reap.
const tinyInit = `#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
echo "HPCVM agent-init"
/bin/hpcvm-agent &
while :; do wait; sleep 1; done
`

// TinyStore publishes the image "tiny" into a new store on the host and
// returns the store's directory: the minimal guest kernel (PVH vmlinux),
// the test initramfs with a second archive appended that adds the real
// hpcvm-agent and /agent-init (rdinit=), and a small empty disk. It boots
// in seconds where the Debian image takes minutes. extra adds files to the
// initramfs (path relative to its root -> content, mode 0755), e.g.
// bin/parsum.
func TinyStore(t *testing.T, extra map[string][]byte) string {
	t.Helper()
	art := FindArtifacts()
	agent := os.Getenv("HPCVM_AGENT")
	if agent == "" {
		agent = filepath.Join(filepath.Dir(HPCVMBin()), "hpcvm-agent")
	}
	Need(t, art.Vmlinux, art.TestInitramfs, agent)
	dir := t.TempDir()
	stage := filepath.Join(dir, "stage")
	if err := os.MkdirAll(filepath.Join(stage, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(agent); err != nil {
		t.Fatal(err)
	} else if err := os.WriteFile(filepath.Join(stage, "bin", "hpcvm-agent"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stage, "agent-init"), []byte(tinyInit), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range extra {
		f := filepath.Join(stage, name)
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	archive := filepath.Join(dir, "extra.cpio.gz")
	cmd := exec.Command("sh", "-c", "find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 >"+archive)
	cmd.Dir = stage
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}
	st, err := images.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(st.Path("tiny", ""), 0o755); err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(art.TestInitramfs)
	if err != nil {
		t.Fatal(err)
	}
	more, err := os.ReadFile(archive)
	if err != nil {
		t.Fatal(err)
	}
	kernel, err := os.ReadFile(art.Vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		images.KernelFile: kernel,
		images.InitrdFile: append(base, more...), // the kernel unpacks concatenated archives in order
		images.DiskFile:   make([]byte, 1<<20),
	}
	m := images.Manifest{Schema: images.ManifestSchema, Name: "tiny", Version: "e2e", BuildKey: "e2e-tiny",
		Cmdline: BaseCmdline + " rdinit=/agent-init", AgentPort: 1024, Created: time.Now()}
	for _, f := range []string{images.DiskFile, images.KernelFile, images.InitrdFile} {
		if err := os.WriteFile(st.Path("tiny", f), files[f], 0o644); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(files[f])
		m.Artifacts = append(m.Artifacts, images.Artifact{Name: f, Size: int64(len(files[f])), SHA256: hex.EncodeToString(sum[:])})
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st.Path("tiny", images.ManifestFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return st.Dir
}

// Parsum builds guest/parsum (the spread-VM tests' pthreads workload) as a
// static binary and returns it.
func Parsum(t *testing.T) []byte {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	bin := filepath.Join(t.TempDir(), "parsum")
	src := filepath.Join(filepath.Dir(file), "..", "..", "guest", "parsum", "parsum.c")
	if out, err := exec.Command("gcc", "-O2", "-static", "-pthread", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("building parsum (gcc, static glibc: apt-get install gcc libc6-dev): %v\n%s", err, out)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
