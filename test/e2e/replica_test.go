//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

// sliceDir makes a node-local directory (the node's /run: the secret must
// not sit on a 9p share) holding a fresh VM secret in key, removed when the
// test ends. With several nodes every node gets the same path and secret,
// as a launcher hands one secret to all of a VM's slices.
func sliceDir(t *testing.T, ctx context.Context, nodes ...*virtnode.Node) string {
	dir := fmt.Sprintf("/run/e2e-slices-%d", time.Now().UnixNano())
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		n.MustRun(t, ctx, fmt.Sprintf("set -e; umask 077; mkdir -p %[1]s; echo %[2]s | base64 -d > %[1]s/key",
			dir, base64.StdEncoding.EncodeToString(key)))
		if err := reloadKVM(ctx, n); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Run(context.Background(), "rm -rf "+dir) })
	}
	return dir
}

// slicePeers is the --peers list for slices placed round-robin on nodes
// (all on loopback when there is one node), ports from base up.
func slicePeers(nodes []*virtnode.Node, slices, base int) string {
	var peers []string
	for i := 0; i < slices; i++ {
		host := "127.0.0.1"
		if len(nodes) > 1 {
			host = nodes[i%len(nodes)].IP
		}
		peers = append(peers, fmt.Sprintf("%s:%d", host, base+i))
	}
	return strings.Join(peers, ",")
}

// sliceOutput is the JSON line `hpcvm slice` prints when it ends.
type sliceOutput struct {
	Exit     string   `json:"exit"`
	Reports  []uint32 `json:"reports"`
	Stats    struct{ Requests, WriteFaults, Replicated int64 }
	HotPages []struct {
		GPA      uint64 `json:"gpa"`
		Requests int64  `json:"requests"`
	} `json:"hot_pages"`
	Elapsed string `json:"elapsed"`
}

// runMicroSlices runs builtin prog on 2 slice processes, slice i on
// nodes[i%len(nodes)], and returns both slices' outputs.
func runMicroSlices(t *testing.T, ctx context.Context, nodes []*virtnode.Node, bin, prog string, iters int, extra ...string) [2]sliceOutput {
	t.Helper()
	dir := sliceDir(t, ctx, nodes...)
	var procs []*virtnode.Proc
	for id := 0; id < 2; id++ {
		argv := []string{bin, "slice", "--id", strconv.Itoa(id), "--peers", slicePeers(nodes, 2, 7710),
			"--vm-id", "e2e-rep", "--secret-file", dir + "/key", "--placement", "0/1",
			"--builtin", prog, "--iters", strconv.Itoa(iters), "--timeout", "5m"}
		p, err := nodes[id%len(nodes)].RunBackground(guestvm.Quote(append(argv, extra...)) + " </dev/null")
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
	}
	var out [2]sliceOutput
	for id, p := range procs {
		res, err := p.Wait(ctx)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("slice %d: exit %d %v\n%s", id, res.ExitCode, err, res)
		}
		if err := json.Unmarshal([]byte(strings.TrimSpace(res.Stdout)), &out[id]); err != nil {
			t.Fatalf("slice %d output %q: %v", id, res.Stdout, err)
		}
	}
	return out
}

// TestReplicatedTablesInNode runs the message-passing micro-guest (a
// vCPU on each slice handing a flag page back and forth) under the node's
// real KVM, whose nested paging makes every walk of a page table a write,
// with the page tables moved (the reference) and replicated, side by side
// (docs/dsm.md, "Replicated page tables"; the figures are in
// docs/benchmarks.md). Both must give mp's exact outcome; replicated, the
// tables must be requested once each instead of on every walk. Timings
// are reported, not asserted.
//
// The node runs single-threaded TCG: under multi-threaded TCG a nested
// guest spinning without exits keeps the other node CPU waiting on it
// (docs/dsm.md, "The platform"), which hangs the node once the page
// tables no longer force the spinning vCPU out.
func TestReplicatedTablesInNode(t *testing.T) {
	virtnode.RequirePrereqs(t)
	bin := mustHPCVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	c, err := virtnode.Start(ctx, virtnode.Config{Nodes: 1, CPUs: 2, MemMiB: 1024, Accel: "tcg,thread=single", Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	n := c.Nodes[0]
	const iters = 50
	tables := map[uint64]bool{0x1000: true, 0x2000: true, 0x3000: true, 0x4000: true, 0x5000: true, 0x6000: true}
	type run struct {
		name  string
		out   [2]sliceOutput
		wall  time.Duration
		table int64 // requests for page-table pages, both slices
	}
	var runs []run
	for _, mode := range []struct {
		name  string
		extra []string
	}{{"moved", nil}, {"replicated", []string{"--replicate-tables"}}} {
		start := time.Now()
		out := runMicroSlices(t, ctx, []*virtnode.Node{n}, bin, "mp", iters, mode.extra...)
		r := run{name: mode.name, out: out, wall: time.Since(start)}
		if len(out[0].Reports) != 1 || out[0].Reports[0] != 0 {
			t.Errorf("%s: mp reports %v, want [0] (no stale read)", mode.name, out[0].Reports)
		}
		for i, o := range out {
			for _, h := range o.HotPages {
				if tables[h.GPA] {
					r.table += h.Requests
					if mode.name == "replicated" && h.Requests > 2 {
						t.Errorf("replicated: slice %d requested page table %#x %d times, want at most 2", i, h.GPA, h.Requests)
					}
				}
			}
			if mode.name == "replicated" && o.Stats.Replicated < int64(len(tables)) {
				t.Errorf("replicated: slice %d holds %d replicas, want %d", i, o.Stats.Replicated, len(tables))
			}
		}
		t.Logf("%s: %d hand-offs in %v (slice 0 %s); requests %d + %d, of which page tables %d",
			mode.name, iters, r.wall.Round(time.Millisecond), out[0].Elapsed, out[0].Stats.Requests, out[1].Stats.Requests, r.table)
		runs = append(runs, r)
	}
	ref, rep := runs[0], runs[1]
	t.Logf("replicated vs moved page tables: %.1fx faster, %.1fx fewer requests",
		ref.wall.Seconds()/rep.wall.Seconds(),
		float64(ref.out[0].Stats.Requests+ref.out[1].Stats.Requests)/float64(rep.out[0].Stats.Requests+rep.out[1].Stats.Requests))
}
