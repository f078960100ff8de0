package virtnode

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// BootTimeout bounds how long StartT waits for all nodes to be ready.
var BootTimeout = 5 * time.Minute

// RequirePrereqs skips the test when virt nodes cannot run here (not root,
// no QEMU, assets not built), giving the reason. With HPCVM_E2E_REQUIRE=1 in
// the environment (set by `make e2e` and CI) a missing prerequisite is a
// test failure instead, so the tier cannot silently skip itself.
func RequirePrereqs(t testing.TB) {
	t.Helper()
	if err := Prerequisites(); err != nil {
		if os.Getenv("HPCVM_E2E_REQUIRE") == "1" {
			t.Fatalf("virt-node prerequisites missing (HPCVM_E2E_REQUIRE=1): %v", err)
		}
		t.Skipf("skipping: %v", err)
	}
}

// StartT starts a cluster for a test: it skips (see RequirePrereqs), fails
// the test if the nodes do not come up, logs every node's console tail if
// the test failed, and closes the cluster in t.Cleanup.
func StartT(t testing.TB, cfg Config) *Cluster {
	t.Helper()
	RequirePrereqs(t)
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	ctx, cancel := context.WithTimeout(context.Background(), BootTimeout)
	defer cancel()
	c, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("virtnode.Start: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.Nodes {
				t.Logf("console of %s (%s), last lines:\n%s", n.Name, n.ConsolePath(), n.ConsoleTail(40))
			}
		}
		c.Close()
	})
	return c
}

// MustRun runs script in the node and fails the test if the harness fails
// or the command exits non-zero. It returns the command's stdout.
func (n *Node) MustRun(t testing.TB, ctx context.Context, script string) string {
	t.Helper()
	r, err := n.Run(ctx, script)
	if err != nil {
		t.Fatalf("%s: %q: %v\n%s", n.Name, script, err, r)
	}
	if r.ExitCode != 0 {
		t.Fatalf("%s: %q failed: %s", n.Name, script, r)
	}
	return strings.TrimSpace(r.Stdout)
}
