//go:build e2e

package virtnode_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

func TestNodeRunsCommands(t *testing.T) {
	c := virtnode.StartT(t, virtnode.Config{Nodes: 1})
	n := c.Nodes[0]
	t.Logf("node boot time (QEMU start to agent ready): %v", n.BootTime)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	r, err := n.Run(ctx, "echo hello; echo oops >&2; exit 3")
	if err != nil {
		t.Fatal(err)
	}
	if r.Stdout != "hello\n" || r.Stderr != "oops\n" || r.ExitCode != 3 {
		t.Fatalf("unexpected result: %s", r)
	}

	if got := n.MustRun(t, ctx, "hostname"); got != "n1" {
		t.Errorf("hostname = %q, want n1", got)
	}
	// The node runs the pinned Debian kernel of the assets (its modules
	// directory is named after the release) with real KVM (emulated SVM).
	a, err := virtnode.FindAssets()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := n.MustRun(t, ctx, "uname -r"), filepath.Base(a.ModDir); got != want {
		t.Errorf("uname -r = %q, want %q (the assets' kernel)", got, want)
	}
	n.MustRun(t, ctx, "test -c /dev/kvm && grep -qw svm /proc/cpuinfo")
	// Modules beyond the initramfs load from the bind-mounted modules dir.
	n.MustRun(t, ctx, "modprobe tun && test -c /dev/net/tun")
	// Host files are visible at the same path; node writes stay in the node.
	n.MustRun(t, ctx, "test -x /usr/bin/qemu-system-x86_64 && echo x > /etc/vn-test && test -f /etc/vn-test")
	n.MustRun(t, ctx, "! test -e /nonexistent-"+strings.Repeat("x", 8))
}

func TestRunCancelKillsCommand(t *testing.T) {
	c := virtnode.StartT(t, virtnode.Config{Nodes: 1})
	n := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, err := n.RunBackground("echo started; sleep 600; echo never")
	if err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(p.Stdout(), "started") {
		if ctx.Err() != nil {
			t.Fatalf("command did not start: %q", p.Stdout())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if p.Exited() {
		t.Fatal("command exited early")
	}
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	r, err := p.Wait(cctx)
	if err != context.Canceled {
		t.Fatalf("Wait after cancel: err = %v, want context.Canceled (%s)", err, r)
	}
	if r.ExitCode != 128+9 || strings.Contains(r.Stdout, "never") {
		t.Errorf("unexpected result after cancel (want SIGKILL, exit 137): %s", r)
	}
	// The node still serves commands, and the process group is gone.
	if got := n.MustRun(t, ctx, "pgrep -x sleep || echo none"); got != "none" {
		t.Errorf("sleep still running after cancel: %q", got)
	}
}

func TestClusterNetwork(t *testing.T) {
	c := virtnode.StartT(t, virtnode.Config{Nodes: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	// busybox-static's ping: the host root (and so the node) may lack iputils.
	n1.MustRun(t, ctx, "busybox ping -c 2 -W 10 "+n2.IP)
	n2.MustRun(t, ctx, "busybox ping -c 2 -W 10 n1") // names from /etc/hosts
	n1.MustRun(t, ctx, "busybox ping -c 1 -W 10 host")
	r, err := c.HostRun(ctx, "busybox ping -c 1 -W 10 "+n2.IP)
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("host -> n2 ping: %v %s", err, r)
	}
	// A TCP connection node to node: n2 listens, n1 sends a line.
	srv, err := n2.RunBackground("busybox nc -l -p 7777")
	if err != nil {
		t.Fatal(err)
	}
	n1.MustRun(t, ctx, "for i in $(seq 50); do echo hello-from-n1 | busybox nc -w 5 "+n2.IP+" 7777 && exit 0; sleep 0.2; done; exit 1")
	res, err := srv.Wait(ctx)
	if err != nil || !strings.Contains(res.Stdout, "hello-from-n1") {
		t.Fatalf("n2 did not receive the line: %v %s", err, res)
	}
}

// TestHungNodeIsDetectedAndRestarted freezes the node's agent (what a node
// hung under a KVM guest looks like from the host: QEMU runs, nothing
// answers), expects Proc.Wait to say so instead of waiting out its context,
// and expects Restart to bring back a fresh node.
func TestHungNodeIsDetectedAndRestarted(t *testing.T) {
	old := virtnode.HungAfter
	virtnode.HungAfter = 8 * time.Second
	t.Cleanup(func() { virtnode.HungAfter = old })
	c := virtnode.StartT(t, virtnode.Config{Nodes: 1})
	n := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	n.MustRun(t, ctx, "echo before > /etc/vn-mark")

	// The command's parent is the agent's worker: stop it.
	p, err := n.RunBackground("kill -STOP $PPID; sleep 600")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = p.Wait(ctx)
	if !errors.Is(err, virtnode.ErrNodeHung) {
		t.Fatalf("Wait on a hung node: err = %v, want ErrNodeHung", err)
	}
	t.Logf("hang reported after %v: %v", time.Since(start).Round(time.Second), strings.SplitN(err.Error(), "\n", 2)[0])
	if ok, why := n.Healthy(); ok || !strings.Contains(why, "hung") {
		t.Fatalf("Healthy() = %v, %q; want false, naming the hang", ok, why)
	}

	if err := c.Restart(ctx, n); err != nil {
		t.Fatal(err)
	}
	if ok, why := n.Healthy(); !ok {
		t.Fatalf("after Restart: %s", why)
	}
	// A fresh node: the mark written before is gone.
	if got := n.MustRun(t, ctx, "cat /etc/vn-mark 2>/dev/null || echo fresh"); got != "fresh" {
		t.Errorf("after Restart /etc/vn-mark = %q, want a fresh node", got)
	}
}
