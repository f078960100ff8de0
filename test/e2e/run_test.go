//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/images"
	"github.com/hpcvm/hpcvm/test/guestvm"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

// `hpcvm run` in the shared virt node. A boot of the default image (make
// image-debian12) costs minutes under nested TCG, so it boots once, for the
// run that checks what depends on a real distribution, and the mechanics
// (exit 0, stdin, --root, signals, cleanup) are checked meanwhile on a tiny
// image that boots in seconds: the minimal test kernel and busybox initramfs
// of the other e2e tests plus the real hpcvm-agent, published in a store
// of its own with correct checksums (so verification passes for it).
//
//   - debian12 (--verify=false), as uid 65534 with groups 65534 100:
//     --env, --workdir, uid/gid/groups in the guest, stdout and stderr kept
//     apart, 100 MB of random data arriving intact (the guest prints its
//     sha256 on stderr), exit 3;
//   - tiny, exit 0: stdin reaches the command, EOF too; --root as a
//     non-root caller runs as uid 0;
//   - tiny, SIGTERM: `sleep 600` gets the SIGTERM sent to hpcvm once the
//     command printed "started": exit 143, no process or temp dir left;
//   - no boot at all: an unknown image is refused listing the store's
//     images; a corrupted image (fake store, one bit flipped in its disk)
//     is refused naming the artifact.
//
// --verify=false for debian12: checksumming its 2 GiB disk through the
// node's 9p mount is slow and the verification cache (per user, keyed by
// inode) does not carry over from the host.
const (
	runImage    = "debian12"
	runDataSize = 100_000_000
	runUID      = 65534
	nodeRunDir  = "/run/hpcvm-e2e-run" // node tmpfs
)

// runDataGuest is the data run's command (sh -c in the guest).
var runDataGuest = `
echo "env=$HPCVM_E2E"
echo "spaced=$SPACED"
echo "cwd=$(pwd)"
echo "ids=$(id -u):$(id -g)"
echo "groups=$(id -G)"
echo to-stderr >&2
head -c ` + strconv.Itoa(runDataSize) + ` /dev/urandom >/dev/shm/data
echo "guest-sha256=$(sha256sum </dev/shm/data | cut -d' ' -f1)" >&2
echo DATA-BEGIN
cat /dev/shm/data
rm -f /dev/shm/data
exit 3
`

func imageStoreDir() string {
	if d := os.Getenv("HPCVM_IMAGE_STORE"); d != "" {
		return d
	}
	return images.DefaultStoreDir
}

// needImage skips (fails with HPCVM_E2E_REQUIRE=1) without the image.
func needImage(t *testing.T, store, name string) {
	t.Helper()
	st, err := images.OpenStore(store)
	if err == nil {
		_, err = st.Get(name)
	}
	if err != nil {
		msg := fmt.Sprintf("image %s not in %s (make image-debian12): %v", name, store, err)
		if os.Getenv("HPCVM_E2E_REQUIRE") == "1" {
			t.Fatal(msg)
		}
		t.Skip("skipping: " + msg)
	}
}

// runCase is one `hpcvm run` started in the node in the background.
type runCase struct {
	name string
	dir  string // node directory: tmp/ (TMPDIR), console.log, out, err, pid
	proc *virtnode.Proc
}

func TestRun(t *testing.T) {
	r := node(t)
	n := r.Node
	store := imageStoreDir()
	if runDebian {
		needImage(t, store, runImage)
	}
	hpcvmHost := mustHPCVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()

	// A node-local copy of hpcvm that uid 65534 can execute (the cluster
	// directory is 0700 and bin/hpcvm may be rebuilt during the run).
	// /dev/kvm as Debian's udev makes it (0666): the node has no udev.
	hpcvm := nodeRunDir + "/hpcvm"
	n.MustRun(t, ctx, fmt.Sprintf("set -e; rm -rf %[1]s; mkdir -p %[1]s; cp %[2]s %[3]s; chmod 755 %[1]s %[3]s; chmod 0666 /dev/kvm",
		nodeRunDir, guestvm.Quote([]string{hpcvmHost}), hpcvm))
	common := []string{hpcvm, "run", "--verify=false", "--image", runImage, "--store", store}

	newCase := func(name string, uid int) *runCase {
		c := &runCase{name: name, dir: nodeRunDir + "/" + name}
		n.MustRun(t, ctx, fmt.Sprintf("set -e; mkdir -p %[1]s/tmp; chown -R %[2]d:%[2]d %[1]s", c.dir, uid))
		return c
	}
	start := func(c *runCase, script string) {
		t.Helper()
		p, err := n.RunBackground(script)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		c.proc = p
	}
	asUser := fmt.Sprintf("setpriv --reuid=%[1]d --regid=%[1]d --groups=100 env HOME=/nonexistent", runUID)
	asUserNoGroups := fmt.Sprintf("setpriv --reuid=%[1]d --regid=%[1]d --clear-groups env HOME=/nonexistent", runUID)

	began := time.Now()
	var data *runCase
	var dataScript string
	if runDebian {
		data = newCase("data", runUID)
		dataScript = fmt.Sprintf(`cd %[1]s && %[2]s TMPDIR=%[1]s/tmp %[3]s --cpus 2 --mem 512MiB --console %[1]s/console.log `+
			`--env HPCVM_E2E=e2e-value --env 'SPACED=a  b' --workdir /usr/share -- sh -c %[4]s >%[1]s/out 2>%[1]s/err`,
			data.dir, asUser, guestvm.Quote(common), guestvm.Quote([]string{runDataGuest}))
		start(data, dataScript)
	}

	// On failure: the debian12 guest console, and hpcvm processes still there.
	t.Cleanup(func() {
		if !t.Failed() || data == nil {
			return
		}
		dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
		defer dcancel()
		res, _ := n.Run(dctx, fmt.Sprintf("tail -n 25 %[1]s/console.log; ls -la %[1]s/tmp", data.dir))
		t.Logf("%s: guest console tail and temp dir:\n%s%s", data.name, res.Stdout, res.Stderr)
		res, _ = n.Run(dctx, "ps -eo pid,etime,args | grep '[h]pcvm run'")
		t.Logf("hpcvm processes in the node:\n%s", res.Stdout)
	})

	// The other cases run while debian12 boots; these two must not boot.
	t.Run("unknown-image", func(t *testing.T) {
		c := newCase("unknown", 0)
		res, err := n.Run(ctx, fmt.Sprintf("TMPDIR=%s/tmp %s run --store %s --image no-such-image -- true; rc=$?; ls -A %s/tmp; exit $rc",
			c.dir, hpcvm, store, c.dir))
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode == 0 || !strings.Contains(res.Stderr, `unknown image "no-such-image"`) || !strings.Contains(res.Stderr, runImage) {
			t.Fatalf("want a non-zero exit and an error naming the image and listing %s: %s", runImage, res)
		}
		if strings.TrimSpace(res.Stdout) != "" {
			t.Errorf("temp dir not empty (a VM was prepared?): %q", res.Stdout)
		}
	})
	t.Run("corrupted-image", func(t *testing.T) {
		fake := fakeStore(t)
		c := newCase("corrupt", 0)
		res, err := n.Run(ctx, fmt.Sprintf("TMPDIR=%s/tmp %s run --store %s --image broken -- true; rc=$?; ls -A %s/tmp; exit $rc",
			c.dir, hpcvm, fake, c.dir))
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode == 0 || !strings.Contains(res.Stderr, "disk.raw does not match its manifest") {
			t.Fatalf("want a non-zero exit naming disk.raw as corrupted: %s", res)
		}
		if strings.TrimSpace(res.Stdout) != "" {
			t.Errorf("temp dir not empty (a VM was prepared?): %q", res.Stdout)
		}
	})

	tinyStore := nodeRunDir + "/tiny-store"
	n.MustRun(t, ctx, fmt.Sprintf("set -e; cp -r %s %s; chmod -R a+rX %s", guestvm.Quote([]string{guestvm.TinyStore(t, nil)}), tinyStore, tinyStore))
	tiny := []string{hpcvm, "run", "--store", tinyStore, "--image", "tiny", "--cpus", "1", "--mem", "256MiB"}

	t.Run("tiny-exit0-stdin-root", func(t *testing.T) {
		c := newCase("stdin", runUID)
		res, err := n.Run(ctx, fmt.Sprintf(`cd %[1]s && printf 'via-stdin\nline2\n' | %[2]s TMPDIR=%[1]s/tmp %[3]s --root `+
			`--console %[1]s/console.log -- sh -c 'cat; echo "uid=$(id -u)"'`, c.dir, asUserNoGroups, guestvm.Quote(tiny)))
		if err != nil {
			t.Fatalf("%v\n%s", err, res)
		}
		if res.ExitCode != 0 {
			t.Fatalf("exit %d, want 0: %s\n%s", res.ExitCode, res, consoleTail(ctx, n, c))
		}
		if res.Stdout != "via-stdin\nline2\nuid=0\n" {
			t.Errorf("stdout %q, want the stdin lines and uid=0 (--root)", res.Stdout)
		}
		checkNoTemp(t, ctx, n, c)
	})

	// HPCVM_E2E_SIGTERM_RUNS=N repeats the SIGTERM case N times: a race
	// between the command's exit status and the connection's end showed
	// up there (docs/agent.md, "Known problems"). It runs with -v so that,
	// should it fail, its stderr has the VMM's vsock log (why the device
	// dropped a connection).
	sigtermRuns := 1
	if v := os.Getenv("HPCVM_E2E_SIGTERM_RUNS"); v != "" {
		if sigtermRuns, _ = strconv.Atoi(v); sigtermRuns < 1 {
			t.Fatalf("HPCVM_E2E_SIGTERM_RUNS=%q: want a positive count", v)
		}
	}
	sigtermTiny := append(append([]string{}, tiny...), "-v")
	for i := range sigtermRuns {
		name := "tiny-sigterm"
		if sigtermRuns > 1 {
			name = fmt.Sprintf("tiny-sigterm-%d", i+1)
		}
		t.Run(name, func(t *testing.T) { runSigterm(t, ctx, n, newCase, sigtermTiny) })
	}

	if !runDebian {
		return
	}
	t.Run("data-exit3", func(t *testing.T) {
		res, err := data.proc.Wait(ctx)
		if err != nil {
			t.Fatalf("%v\n%s", err, res)
		}
		if res.ExitCode != 3 && guestvm.TripleFaulted(n.MustRun(t, ctx, "tail -c 4000 "+data.dir+"/err")) {
			// A known nested-virtualization failure of virt nodes
			// (docs/testing.md, guestvm.PlatformReset); a VMM bug would
			// reset again.
			t.Logf("attempt 1: the guest triple-faulted (exit %d); running once more", res.ExitCode)
			start(data, dataScript)
			if res, err = data.proc.Wait(ctx); err != nil {
				t.Fatalf("%v\n%s", err, res)
			}
		}
		t.Logf("finished %.0f s after the runs began", time.Since(began).Seconds())
		if res.ExitCode != 3 {
			t.Fatalf("exit %d, want 3: %s\nstderr file:\n%s", res.ExitCode, res, n.MustRun(t, ctx, "tail -c 4000 "+data.dir+"/err"))
		}
		// The node summarises the 100 MB stdout: its size, the text before
		// the data, and the data's sha256.
		sum := n.MustRun(t, ctx, fmt.Sprintf(`cd %s && size=$(stat -c %%s out) && echo "size=$size" && `+
			`echo "datasha=$(tail -c %d out | sha256sum | cut -d' ' -f1)" && echo HEADER && head -c $((size - %d)) out | head -c 4096`,
			data.dir, runDataSize, runDataSize))
		stderr := n.MustRun(t, ctx, "head -c 65536 "+data.dir+"/err")
		head, header, _ := strings.Cut(sum, "\nHEADER\n")
		want := "env=e2e-value\nspaced=a  b\ncwd=/usr/share\n" + fmt.Sprintf("ids=%[1]d:%[1]d\ngroups=%[1]d 100\n", runUID) + "DATA-BEGIN"
		if header != want {
			t.Errorf("stdout before the data:\n%q\nwant\n%q", header, want)
		}
		size, _ := strconv.Atoi(field(head, "size"))
		if size != len(want)+1+runDataSize {
			t.Errorf("stdout is %d bytes, want %d (%d header + %d data)", size, len(want)+1+runDataSize, len(want)+1, runDataSize)
		}
		guestSum := field(stderr, "guest-sha256")
		if guestSum == "" || guestSum != field(head, "datasha") {
			t.Errorf("data sha256: guest %q, received %q", guestSum, field(head, "datasha"))
		}
		t.Logf("stdout: %d bytes, %q before the data; data sha256 %s in the guest, %s received", size, header, guestSum, field(head, "datasha"))
		if !strings.Contains(stderr, "to-stderr\n") {
			t.Errorf("stderr lacks the guest's stderr line: %q", stderr)
		}
		if strings.Contains(stderr, "env=") || strings.Contains(header, "to-stderr") || strings.Contains(header, "guest-sha256") {
			t.Errorf("stdout and stderr mixed:\nstdout: %q\nstderr: %q", header, stderr)
		}
		checkNoTemp(t, ctx, n, data)
	})
}

// field returns the value of the first "key=value" line in s.
func field(s, key string) string {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + `=(.*)$`).FindStringSubmatch(s)
	if m == nil {
		return ""
	}
	return m[1]
}

// checkNoTemp checks hpcvm removed its VM work directory (disk overlay,
// sockets, console copy).
func checkNoTemp(t *testing.T, ctx context.Context, n *virtnode.Node, c *runCase) {
	t.Helper()
	if left := n.MustRun(t, ctx, "ls -A "+c.dir+"/tmp"); left != "" {
		t.Errorf("%s: hpcvm left %q in its TMPDIR", c.name, left)
	}
}

// fakeStore makes an image store on the host (visible in the node at the
// same path) holding "broken": small artifacts and a manifest whose disk
// checksum does not match the disk.
func fakeStore(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	st, err := images.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(st.Path("broken", ""), 0o755); err != nil {
		t.Fatal(err)
	}
	m := images.Manifest{Schema: images.ManifestSchema, Name: "broken", Version: "1", BuildKey: "e2e",
		Cmdline: "root=/dev/vda console=ttyS0", AgentPort: 1024, Created: time.Now()}
	for _, f := range []string{images.DiskFile, images.KernelFile, images.InitrdFile} {
		data := []byte(strings.Repeat("contents of "+f+"\n", 4096))
		sum := sha256.Sum256(data)
		if f == images.DiskFile {
			data[100] ^= 1 // one bit differs from what the manifest says
		}
		if err := os.WriteFile(st.Path("broken", f), data, 0o644); err != nil {
			t.Fatal(err)
		}
		m.Artifacts = append(m.Artifacts, images.Artifact{Name: f, Size: int64(len(data)), SHA256: hex.EncodeToString(sum[:])})
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st.Path("broken", images.ManifestFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return filepath.Clean(dir)
}

// consoleTail returns the end of a run's guest console (--console file).
func consoleTail(ctx context.Context, n *virtnode.Node, c *runCase) string {
	res, _ := n.Run(ctx, "tail -n 30 "+c.dir+"/console.log")
	return c.name + ": guest console (last lines):\n" + res.Stdout
}

// runSigterm is the SIGTERM case: `sleep 600` gets the SIGTERM sent to
// hpcvm once the command printed "started"; hpcvm exits 143 and leaves
// no process or temp dir behind.
func runSigterm(t *testing.T, ctx context.Context, n *virtnode.Node, newCase func(string, int) *runCase, tiny []string) {
	c := newCase("sigterm", 0)
	p, err := n.RunBackground(fmt.Sprintf(`cd %[1]s && echo $$ >pid && exec env TMPDIR=%[1]s/tmp %[2]s --console %[1]s/console.log `+
		`-- sh -c 'echo started; exec sleep 600'`, c.dir, guestvm.Quote(tiny)))
	if err != nil {
		t.Fatal(err)
	}
	// Wait for the command's first output (the agent is up and the
	// command runs), then signal hpcvm as a shell or Slurm would.
	for !strings.Contains(p.Stdout(), "started") {
		if p.Exited() {
			res, _ := p.Wait(ctx)
			t.Fatalf("hpcvm ended before the command started: %s\n%s", res, consoleTail(ctx, n, c))
		}
		select {
		case <-ctx.Done():
			p.Kill()
			t.Fatalf("no \"started\" from the guest command: %v\nstderr so far:\n%s", ctx.Err(), p.Stderr())
		case <-time.After(500 * time.Millisecond):
		}
	}
	n.MustRun(t, ctx, fmt.Sprintf("kill -TERM $(cat %s/pid)", c.dir))
	res, err := p.Wait(ctx)
	if err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	if res.ExitCode != 128+15 {
		t.Fatalf("exit %d, want 143 (SIGTERM): %s\n%s", res.ExitCode, res, consoleTail(ctx, n, c))
	}
	if res.Stdout != "started\n" {
		t.Errorf("stdout %q, want \"started\\n\"", res.Stdout)
	}
	left, err := n.Run(ctx, fmt.Sprintf("kill -0 $(cat %[1]s/pid) 2>/dev/null && echo process-alive; "+
		"pgrep -af 'hpcvm-e2e-run/[s]igterm'; ls -A %[1]s/tmp", c.dir))
	if err != nil || strings.TrimSpace(left.Stdout) != "" {
		t.Errorf("left behind after SIGTERM (process, or temp dir entries): %q %v", left.Stdout, err)
	}
}
