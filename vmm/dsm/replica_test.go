package dsm

import (
	"encoding/binary"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
	"github.com/hpcvm/hpcvm/vmm/microguest"
)

func TestMergeWord(t *testing.T) {
	const (
		entry = 0x1234000 | ptePresent | 1<<1 // present, writable
		other = 0x5678000 | ptePresent | 1<<1
	)
	for _, c := range []struct {
		name         string
		base, x, y   uint64
		want         uint64
		wantConflict bool
	}{
		{"only one side changed", entry, entry | pteAccessed, entry, entry | pteAccessed, false},
		{"both set the same bit", entry, entry | pteAccessed, entry | pteAccessed, entry | pteAccessed, false},
		{"walkers set A and D", entry, entry | pteAccessed, entry | pteDirty, entry | pteAD, false},
		{"A cleared here, D set there", entry | pteAccessed, entry, entry | pteAD, entry | pteDirty, false},
		{"cleared entry keeps no walker bits", entry, 0, entry | pteAccessed, 0, false},
		{"repointed entry keeps no walker bits", entry, other, entry | pteDirty, other, false},
		{"write-protect keeps the dirty bit set meanwhile", entry, entry &^ (1 << 1), entry | pteDirty, entry&^(1<<1) | pteDirty, false},
		{"new entry in an empty slot", 0, entry, 0, entry, false},
		{"two software changes conflict", entry, other, 0, 0, true},
	} {
		got, ok := mergeWord(c.base, c.x, c.y)
		if ok == c.wantConflict || ok && got != c.want {
			t.Errorf("%s: mergeWord(%#x, %#x, %#x) = %#x, %v; want %#x, conflict %v", c.name, c.base, c.x, c.y, got, ok, c.want, c.wantConflict)
		}
		// Both slices merge with the sides swapped: they must agree.
		got2, ok2 := mergeWord(c.base, c.y, c.x)
		if ok2 != ok || got2 != got {
			t.Errorf("%s: not symmetric: %#x,%v vs %#x,%v", c.name, got, ok, got2, ok2)
		}
	}
}

// TestPageTablePagesOfMicroGuest: the walker finds exactly the
// micro-guest's PML4, PDPT and four page directories (2 MiB leaves).
func TestPageTablePagesOfMicroGuest(t *testing.T) {
	mem, err := memory.NewRAM(testMem, layout.MMIOGapStart)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	if err := (microguest.Program{Code: []byte{0xF4}}).LoadInto(mem); err != nil {
		t.Fatal(err)
	}
	set, err := pageTablePages(mem, microguest.PML4Addr, 100)
	if err != nil {
		t.Fatal(err)
	}
	want := TableSet{1: 4, 2: 3, 3: 2, 4: 2, 5: 2, 6: 2}
	if len(set) != len(want) {
		t.Fatalf("table pages %v, want %v", set, want)
	}
	for pfn, l := range want {
		if set[pfn] != l {
			t.Fatalf("table pages %v: %#x should be level %d", set, pfn, l)
		}
	}
}

// TestReplicatedTablesKeepExactOutcomes: with the page-table pages
// replicated (each slice writes its own copy: the processor's accessed
// and dirty bits; updates published ahead of every message), the
// memory-model micro-guests still produce exactly their outcomes, and
// the tables really were replicated on both slices.
func TestReplicatedTablesKeepExactOutcomes(t *testing.T) {
	on := func(_ int, cfg *SliceConfig) { cfg.ReplicateTables = true }
	for _, c := range coherenceCases {
		for _, slices := range []int{2, 3} {
			// With 2 vCPUs the third slice runs none but is home to a
			// third of the pages, so requests cross all three.
			t.Run(fmt.Sprintf("%s/%dslices", c.name, slices), func(t *testing.T) {
				iters := scaled(c.iters / 10)
				r := runInProcessWith(t, slices, c.ncpu, c.prog, iters, on)
				for _, ck := range c.checks {
					ck(t, c.ncpu, iters, r)
				}
				for i, s := range r.stats {
					if s.Replicated == 0 && len(splitVCPUs(c.ncpu, slices)[i]) > 0 {
						t.Errorf("slice %d runs vCPUs but replicated no page: %v", i, r)
					}
				}
				t.Logf("%s: %v", c.prog, r)
			})
		}
	}
}

// replicaPair is two nodes sharing the page tables of tables (pfn ->
// level) as replicas.
func replicaPair(t testing.TB, tables TableSet, failed chan<- error) *nodePair {
	return replicaPairWith(t, tables, failed, nil)
}

// replicaPairWith is replicaPair with mod adjusting the nodes' configuration.
func replicaPairWith(t testing.TB, tables TableSet, failed chan<- error, mod func(i int, c *NodeConfig)) *nodePair {
	p := newNodesWith(t, 2, func(i int, err error) {
		select {
		case failed <- fmt.Errorf("node %d: %w", i, err):
		default:
		}
	}, mod)
	for _, n := range p.nodes {
		n.SetTables(func(q uint64) int { return tables[q] })
	}
	// Node 0 owns every page at first; node 1's join turns node 0's copy
	// into a replica too.
	for pfn := range tables {
		for i, n := range p.nodes {
			if err := n.Replicate(pfn); err != nil {
				t.Fatalf("node %d: %v", i, err)
			}
		}
		for i, n := range p.nodes {
			idx, _ := n.pageIndex(pfn)
			n.pages[idx].mu.Lock()
			st := n.pages[idx].st
			n.pages[idx].mu.Unlock()
			if st != replica {
				t.Fatalf("node %d holds page %#x %v, want replica", i, pfn, st)
			}
		}
	}
	return p
}

// word returns node i's host copy of the page's word w (mapped: a
// replica or an exclusive page).
func (p *nodePair) word(i int, pfn uint64, w int) uint64 {
	idx, _ := p.nodes[i].pageIndex(pfn)
	return loadWord(p.nodes[i].hostPage(idx), w)
}

func (p *nodePair) setWord(i int, pfn uint64, w int, v uint64) {
	idx, _ := p.nodes[i].pageIndex(pfn)
	host := p.nodes[i].hostPage(idx)
	for !casWord(host, w, loadWord(host, w), v) {
	}
}

// ping sends a message from node i to the other: every send publishes
// the sender's replica changes first.
func (p *nodePair) ping(i int) { p.nodes[i].send(1-i, &Msg{Type: MsgHeartbeat}) }

func waitWord(t *testing.T, p *nodePair, i int, pfn uint64, w int, want uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.word(i, pfn, w) != want {
		if time.Now().After(deadline) {
			t.Fatalf("node %d word %d is %#x, want %#x", i, w, p.word(i, pfn, w), want)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestReplicaUpdatesPublishedAheadOfMessages drives the replica protocol
// directly: a write on one replica reaches the other with the writer's
// next message, not before; accessed/dirty bits set on both sides at
// once merge to the same entry on both.
func TestReplicaUpdatesPublishedAheadOfMessages(t *testing.T) {
	const pfn = 0x40
	const entry = 0x7000 | ptePresent | 1<<1
	failed := make(chan error, 1)
	p := replicaPair(t, TableSet{pfn: 1}, failed)

	p.setWord(0, pfn, 3, entry)
	if got := p.word(1, pfn, 3); got != 0 {
		t.Fatalf("node 1 saw %#x before node 0 sent anything", got)
	}
	p.ping(0)
	waitWord(t, p, 1, pfn, 3, entry)

	// Both processors mark the entry: accessed on node 0, dirty on node 1,
	// published crossing each other.
	p.setWord(0, pfn, 3, entry|pteAccessed)
	p.setWord(1, pfn, 3, entry|pteDirty)
	p.ping(0)
	p.ping(1)
	waitWord(t, p, 0, pfn, 3, entry|pteAD)
	waitWord(t, p, 1, pfn, 3, entry|pteAD)

	select {
	case err := <-failed:
		t.Fatal(err)
	default:
	}
}

// TestReplicaConflictingWritesStopTheVM: two different software changes
// of one entry on two slices cannot both be right; the node fails with
// an error naming the page and the entry rather than pick one.
func TestReplicaConflictingWritesStopTheVM(t *testing.T) {
	const pfn = 0x41
	failed := make(chan error, 2)
	p := replicaPair(t, TableSet{pfn: 1}, failed)
	p.setWord(0, pfn, 9, 0x3000|ptePresent)
	p.setWord(1, pfn, 9, 0x4000|ptePresent)
	p.ping(0)
	p.ping(1)
	wantNodeFailure(t, failed, "replicated page table 0x41000, entry 9", "conflicting writes")
}

// wantNodeFailure waits for a node failure whose error contains want;
// what names the cause for the test's message.
func wantNodeFailure(t *testing.T, failed <-chan error, want, what string) {
	t.Helper()
	select {
	case err := <-failed:
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("%s: error %q does not contain %q", what, err, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not stop the node", what)
	}
}

// TestKernelTablePages builds the page tables of a Linux-like guest (the
// kernel image at 16..32 MiB, mapped with 2 MiB pages from PML4 entry 511,
// PDPT entry 510, with its static tables inside; a direct map and a table
// allocated later outside it) and checks that every table of the kernel
// half is picked with its level, and nothing from an address space whose
// root is not in the image (a process's).
func TestKernelTablePages(t *testing.T) {
	mem, err := memory.NewRAM(128<<20, layout.MMIOGapStart)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	put := func(table uint64, i int, v uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		if _, err := mem.WriteAt(b[:], int64(table+uint64(8*i))); err != nil {
			t.Fatal(err)
		}
	}
	const (
		tbl     = ptePresent | 1<<1
		huge    = 1 << 7
		root    = 0x1A0A000 // init_top_pgt
		l3      = 0x1A0E000 // level3_kernel_pgt
		l2      = 0x1A0F000 // level2_kernel_pgt
		fixPD   = 0x1A10000 // level2_fixmap_pgt
		fixPT   = 0x1A11000 // level1_fixmap_pgt
		lateL1  = 0x5000000 // a table allocated at run time
		dmPDPT  = 0x6000000 // the direct map's PDPT
		process = 0x7000000 // a process's PGD
	)
	put(root, 511, l3|tbl)
	put(root, 273, dmPDPT|tbl)
	put(l3, 510, l2|tbl)
	put(l3, 511, fixPD|tbl)
	for i := 8; i < 16; i++ { // the image: 16..32 MiB
		put(l2, i, uint64(i)<<21|tbl|huge)
	}
	put(fixPD, 506, fixPT|tbl)
	put(fixPD, 507, lateL1|tbl)
	put(dmPDPT, 0, 0|tbl|huge)
	put(process, 511, l3|tbl)

	set, err := kernelTablePages(mem, root, 100)
	if err != nil {
		t.Fatal(err)
	}
	want := TableSet{root / PageSize: 4, l3 / PageSize: 3, dmPDPT / PageSize: 3, l2 / PageSize: 2,
		fixPD / PageSize: 2, fixPT / PageSize: 1, lateL1 / PageSize: 1}
	if len(set) != len(want) {
		t.Fatalf("kernel tables %v, want %v", set, want)
	}
	for pfn, l := range want {
		if set[pfn] != l {
			t.Errorf("kernel tables %v: %#x should be level %d", set, pfn*PageSize, l)
		}
	}
	// A process's root shares the kernel half; the root itself is left out.
	set, err = kernelTablePages(mem, process, 100)
	if err != nil || len(set) != 5 || set[l3/PageSize] != 3 || set[l2/PageSize] != 2 || set[fixPD/PageSize] != 2 ||
		set[fixPT/PageSize] != 1 || set[lateL1/PageSize] != 1 {
		t.Errorf("from a process's root: %v, %v; want the kernel half under entry 511 and not the root", set, err)
	}
	// After boot Linux splits some of the image's 2 MiB pages (the one
	// holding init_top_pgt among them): the root is still recognized.
	const split = 0x1B00000 // a page table mapping 26..28 MiB in 4 KiB pages
	put(l2, root>>21, split|tbl)
	for i := range wordsPerPage {
		put(split, i, (root&hugeFrame)+uint64(i)*PageSize|tbl)
	}
	if set, err = kernelTablePages(mem, root, 100); err != nil || set[root/PageSize] != 4 || set[split/PageSize] != 1 {
		t.Errorf("with the image's 2 MiB page split: %v, %v; want the root (level 4) and the split table (level 1)", set, err)
	}
	// An address space without the kernel mapping gives nothing.
	if set, err = kernelTablePages(mem, 0x7100000, 100); err != nil || len(set) != 0 {
		t.Errorf("from an empty root: %v, %v; want nothing", set, err)
	}
}

// TestReplicaUnlinkDereplicates: a replicated table whose parent entry a
// publish shows cleared is being freed by the guest. Both slices stop
// taking it for a table, the slice that unlinked it becomes its single
// writer, and from then on it moves as data: the other slice reads what
// the first wrote, and its own write takes the page over.
func TestReplicaUnlinkDereplicates(t *testing.T) {
	const parent, child = 0x42, 0x43
	failed := make(chan error, 2)
	p := replicaPair(t, TableSet{parent: 2, child: 1}, failed)
	p.setWord(0, parent, 7, child*PageSize|ptePresent|1<<1)
	p.ping(0)
	waitWord(t, p, 1, parent, 7, child*PageSize|ptePresent|1<<1)
	p.setWord(0, parent, 7, child*PageSize|ptePresent|1<<1|pteAccessed) // a walker's bit: no unlink
	p.ping(0)
	waitWord(t, p, 1, parent, 7, child*PageSize|ptePresent|1<<1|pteAccessed)
	for i, n := range p.nodes {
		if n.isUnlinked(child) || n.Stats.Unlinked.Load() != 0 {
			t.Fatalf("node %d declassified the child after an accessed bit", i)
		}
	}
	p.setWord(0, parent, 7, 0)
	p.ping(0)
	state := func(i int) pstate {
		idx, _ := p.nodes[i].pageIndex(child)
		pg := &p.nodes[i].pages[idx]
		pg.mu.Lock()
		defer pg.mu.Unlock()
		return pg.st
	}
	deadline := time.Now().Add(10 * time.Second)
	for state(0) != exclusive || state(1) != invalid {
		if time.Now().After(deadline) {
			t.Fatalf("after the unlink: node 0 holds the child %v, node 1 %v; want exclusive and invalid", state(0), state(1))
		}
		time.Sleep(time.Millisecond)
	}
	for i, n := range p.nodes {
		if n.isTable(child) || n.Stats.Unlinked.Load() != 1 {
			t.Errorf("node %d still takes the unlinked child for a table (Unlinked %d)", i, n.Stats.Unlinked.Load())
		}
		if !n.isTable(parent) {
			t.Errorf("node %d dropped the parent table too", i)
		}
	}
	// The freed table is data now: single-writer coherence again.
	data := []byte("no longer a page table")
	if _, err := p.nodes[0].WriteAt(data, child*PageSize+64); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := p.nodes[1].ReadAt(got, child*PageSize+64); err != nil || string(got) != string(data) {
		t.Fatalf("node 1 reads %q, %v; want %q", got, err, data)
	}
	if _, err := p.nodes[1].WriteAt([]byte{'N'}, child*PageSize+64); err != nil {
		t.Fatal(err)
	}
	if state(1) != exclusive || state(0) != invalid {
		t.Errorf("after node 1's write: node 0 %v, node 1 %v; want invalid and exclusive", state(0), state(1))
	}
	if _, err := p.nodes[0].ReadAt(got[:1], child*PageSize+64); err != nil || got[0] != 'N' {
		t.Errorf("node 0 reads %q, %v; want N", got[:1], err)
	}
	select {
	case err := <-failed:
		t.Fatalf("a node failed: %v", err)
	default:
	}
	// Linked again as a table (a rescan finds it): taken for one again.
	if !p.nodes[0].Relink(child) || p.nodes[0].Relink(child) || !p.nodes[0].isTable(child) {
		t.Errorf("Relink: the child is not a table again on node 0")
	}
}

// TestReplicaConvergesUnderConcurrentWrites: both slices' "processors"
// keep setting accessed/dirty bits on every entry of a replicated table
// while each slice's "kernel" rewrites its own half of the entries and
// sends messages; once both have published, the two replicas are equal
// and every entry holds the last frame its kernel wrote.
func TestReplicaConvergesUnderConcurrentWrites(t *testing.T) {
	const pfn = 0x44
	failed := make(chan error, 2)
	p := replicaPair(t, TableSet{pfn: 1}, failed)
	var last [2][wordsPerPage]uint64 // per node: the entries it wrote last (its half)
	stop := make(chan struct{})
	var walkers sync.WaitGroup
	for i := 0; i < 2; i++ {
		walkers.Add(1)
		go func(i int) { // a processor: only ever sets A or D on present entries
			defer walkers.Done()
			idx, _ := p.nodes[i].pageIndex(pfn)
			host := p.nodes[i].hostPage(idx)
			for w := 0; ; w = (w + 7) % wordsPerPage {
				select {
				case <-stop:
					return
				default:
				}
				v := loadWord(host, w)
				if v&ptePresent != 0 {
					casWord(host, w, v, v|[]uint64{pteAccessed, pteDirty}[w%2])
				}
			}
		}(i)
	}
	for round := 1; round <= 200; round++ {
		for i := 0; i < 2; i++ {
			w := i*wordsPerPage/2 + round%(wordsPerPage/2)
			v := uint64(round*2+i)<<12 | ptePresent | 1<<1
			p.setWord(i, pfn, w, v) // this node's kernel owns word w
			last[i][w] = v
			p.ping(i)
		}
	}
	close(stop)
	walkers.Wait()
	p.ping(0)
	p.ping(1)
	deadline := time.Now().Add(10 * time.Second)
	for {
		same := true
		for w := 0; w < wordsPerPage; w++ {
			if p.word(0, pfn, w) != p.word(1, pfn, w) {
				same = false
				break
			}
		}
		if same {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the replicas did not converge")
		}
		time.Sleep(time.Millisecond)
	}
	for i := 0; i < 2; i++ {
		for w, v := range last[i] {
			if v != 0 && p.word(0, pfn, w)&^pteAD != v {
				t.Errorf("entry %d is %#x, want %#x (plus accessed/dirty bits)", w, p.word(0, pfn, w), v)
			}
		}
	}
	select {
	case err := <-failed:
		t.Fatal(err)
	default:
	}
}

// TestDepsWaitForEarlierUpdates: with three slices, a message that
// follows (causally) another slice's update must not be read before that
// update has arrived. Node 2 gets node 1's deps frame naming one more
// update of node 0's than it has received: node 1's connection must stall
// until node 0's frame comes.
func TestDepsWaitForEarlierUpdates(t *testing.T) {
	p := newNodes(t, 3, nil)
	nd := p.nodes[2]
	const pfn = 0x42
	done := make(chan struct{})
	go func() {
		nd.Deliver(1, &Msg{Type: MsgDeps, Seen: []uint64{1, 0, 0}})
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("the deps frame was passed before the update it names arrived")
	case <-time.After(100 * time.Millisecond):
	}
	nd.Deliver(0, &Msg{Type: MsgUpdate, Page: pfn, Words: []WordUpdate{{Index: 1, Old: 0, New: 7}}})
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the deps frame still waits after the update it names arrived")
	}
	// A deps frame with the wrong number of slices is a protocol error.
	failed := make(chan error, 1)
	q := newNodes(t, 3, func(i int, err error) { failed <- err })
	q.nodes[2].Deliver(1, &Msg{Type: MsgDeps, Seen: []uint64{1, 0}})
	wantNodeFailure(t, failed, "2 update counts for 3 slices", "a malformed deps frame")
}

// TestJoinAppliesOnlyUpdatesTheContentLacks: updates that reach a slice
// while its replica request is in flight are held; once the content
// comes, those it includes (by its update counts) are skipped and the
// others applied.
func TestJoinAppliesOnlyUpdatesTheContentLacks(t *testing.T) {
	p := newNodes(t, 3, nil)
	nd := p.nodes[2]
	const pfn = 0x43
	nd.SetTables(func(q uint64) int {
		if q == pfn {
			return 1
		}
		return 0
	})
	idx, _ := nd.pageIndex(pfn)
	nd.startJoin(idx)
	// Node 0's first update is in the content; node 1's is not.
	nd.Deliver(0, &Msg{Type: MsgUpdate, Page: pfn, Words: []WordUpdate{{Index: 5, Old: 0, New: 0x5000 | ptePresent}}})
	nd.Deliver(1, &Msg{Type: MsgUpdate, Page: pfn, Words: []WordUpdate{{Index: 6, Old: 0, New: 0x6000 | ptePresent}}})
	content := make([]byte, PageSize)
	binary.LittleEndian.PutUint64(content[8*7:], 0x7000|ptePresent) // a change the content has from elsewhere
	nd.onReplicaGrant(0, idx, &Msg{Type: MsgGrant, Page: pfn, Flags: FlagReplica | FlagData | FlagSeen, Data: content,
		Seen: []uint64{1, 0, 0}})
	host := nd.hostPage(idx)
	for w, want := range map[int]uint64{5: 0, 6: 0x6000 | ptePresent, 7: 0x7000 | ptePresent} {
		if got := loadWord(host, w); got != want {
			t.Errorf("word %d = %#x, want %#x", w, got, want)
		}
	}
	if nd.pages[idx].st != replica {
		t.Errorf("page state %v after the replica grant, want replica", nd.pages[idx].st)
	}
	// Later updates apply directly.
	nd.Deliver(0, &Msg{Type: MsgUpdate, Page: pfn, Words: []WordUpdate{{Index: 8, Old: 0, New: 0x8000 | ptePresent}}})
	if got := loadWord(host, 8); got != 0x8000|ptePresent {
		t.Errorf("word 8 = %#x after a later update, want %#x", got, 0x8000|ptePresent)
	}
}

// TestDescribeAddrWalksLocalReplicas: the stop-time report translates a
// kernel address through the replicated tables each slice holds and
// gives the page's state there, with the word only where the page is.
func TestDescribeAddrWalksLocalReplicas(t *testing.T) {
	const root, l3, l2, l1, data = 0x50, 0x51, 0x52, 0x53, 0x60
	const va = 0xffff888000001008 // PML4 273, PDPT 0, PD 0, PT 1, offset 8
	failed := make(chan error, 2)
	p := replicaPair(t, TableSet{root: 4, l3: 3, l2: 2, l1: 1}, failed)
	const tbl = ptePresent | 1<<1
	p.setWord(0, root, 273, l3*PageSize|tbl)
	p.setWord(0, l3, 0, l2*PageSize|tbl)
	p.setWord(0, l2, 0, l1*PageSize|tbl)
	p.setWord(0, l1, 1, data*PageSize|tbl)
	p.ping(0)
	waitWord(t, p, 1, l1, 1, data*PageSize|tbl)
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 0x1234)
	if _, err := p.nodes[0].WriteAt(b[:], data*PageSize+8); err != nil {
		t.Fatal(err)
	}
	if got, want := p.nodes[0].DescribeAddr(root*PageSize, va), "gpa=0x60008 exclusive word=0x1234"; got != want {
		t.Errorf("slice 0: %q, want %q", got, want)
	}
	if got, want := p.nodes[1].DescribeAddr(root*PageSize, va), "gpa=0x60008 invalid"; got != want {
		t.Errorf("slice 1: %q, want %q", got, want)
	}
	if got := p.nodes[1].DescribeAddr(root*PageSize, va+1<<21); !strings.Contains(got, "not mapped (level 2") {
		t.Errorf("unmapped address: %q", got)
	}
	if got := p.nodes[1].DescribeAddr(data*PageSize, va); !strings.Contains(got, "not on this slice (invalid)") {
		t.Errorf("walk through a page this slice lacks: %q", got)
	}
}

// TestColdReplicasSkippedAndWarmed: a replica unchanged for coldAfter
// publishes is write-protected and no longer compared; a write to it
// faults, which lifts the protection, and the write is published; an
// update from the other slice to a cold replica is applied all the same.
func TestColdReplicasSkippedAndWarmed(t *testing.T) {
	const pfn = 0x44
	failed := make(chan error, 2)
	p := replicaPair(t, TableSet{pfn: 1}, failed)
	pp := newPipe(t)
	cold := func(i int) bool {
		idx, _ := p.nodes[i].pageIndex(pfn)
		p.nodes[i].rep.mu.Lock()
		defer p.nodes[i].rep.mu.Unlock()
		r := p.nodes[i].rep.twins[idx]
		return r != nil && r.cold
	}
	for i := 0; i < 2; i++ {
		for range coldAfter {
			p.ping(i)
		}
		if !cold(i) || p.nodes[i].Stats.Cooled.Load() != 1 {
			t.Fatalf("node %d: replica not cold after %d quiet publishes (cooled %d)", i, coldAfter, p.nodes[i].Stats.Cooled.Load())
		}
	}
	// A write on node 0 (from a syscall, as a walker's would come from
	// the vCPU) faults on the protection, warms the page and is published.
	idx, _ := p.nodes[0].pageIndex(pfn)
	pp.kernelWrite(t, p.nodes[0].hostPage(idx)[5*8:], 0x63)
	if cold(0) {
		t.Fatal("node 0: the replica is still cold after a write")
	}
	p.ping(0)
	// Node 1's replica is cold: the update warms it before it is applied.
	waitWord(t, p, 1, pfn, 5, 0x63)
	if cold(1) {
		t.Error("node 1: a replica an update was applied to is still cold")
	}
	// Quiet again: warmed once, each needs twice as many quiet publishes
	// to cool again.
	for range coldAfter {
		p.ping(0)
		p.ping(1)
	}
	if cold(0) || cold(1) {
		t.Errorf("cold again after %d quiet publishes, want the back-off to double that: node 0 %v, node 1 %v", coldAfter, cold(0), cold(1))
	}
	for range coldAfter {
		p.ping(0)
		p.ping(1)
	}
	if !cold(0) || !cold(1) {
		t.Errorf("not cold again after %d quiet publishes: node 0 %v, node 1 %v", 2*coldAfter, cold(0), cold(1))
	}
	select {
	case err := <-failed:
		t.Fatalf("a node failed: %v", err)
	default:
	}
}

// A replica written again each time it cooled backs off: it needs twice as
// many quiet publishes per warming before it cools again.
func TestColdReplicaBacksOff(t *testing.T) {
	const pfn = 0x44
	failed := make(chan error, 2)
	p := replicaPair(t, TableSet{pfn: 1}, failed)
	pp := newPipe(t)
	nd := p.nodes[0]
	idx, _ := nd.pageIndex(pfn)
	cold := func() bool {
		nd.rep.mu.Lock()
		defer nd.rep.mu.Unlock()
		r := nd.rep.twins[idx]
		return r != nil && r.cold
	}
	for range coldAfter {
		p.ping(0)
	}
	if !cold() {
		t.Fatalf("not cold after %d quiet publishes", coldAfter)
	}
	for heat := 1; heat <= 4; heat++ {
		pp.kernelWrite(t, nd.hostPage(idx)[5*8:], byte(heat)|1)
		if cold() {
			t.Fatalf("warming %d: still cold after a write", heat)
		}
		p.ping(0) // publishes the write
		want := coldAfter << heat
		pings := 0
		for !cold() && pings <= want {
			p.ping(0)
			pings++
		}
		// The node's own heartbeats may publish too: at most want of
		// ours, and more than the threshold before this warming.
		if pings > want || pings <= want/2 {
			t.Fatalf("warming %d: cooled after %d quiet publishes, want %d", heat, pings, want)
		}
	}
	if got := nd.Stats.Cooled.Load(); got != 5 {
		t.Errorf("cooled %d times, want 5", got)
	}
	select {
	case err := <-failed:
		t.Fatalf("a node failed: %v", err)
	default:
	}
}

// BenchmarkPublishReplicas times one publish over 100 replicated tables
// with nothing changed (the common case: a message with no table write
// since the last), with replicas compared every time (never-cold, as
// before session 11) and left out once cold (the default); and with one
// word changed in one table (the word loop runs for that page only; with
// cooling the write first faults on the cold page). docs/dsm.md,
// "Replicated page tables".
func BenchmarkPublishReplicas(b *testing.B) {
	tables := TableSet{}
	for pfn := uint64(0x100); pfn < 0x100+100; pfn++ {
		tables[pfn] = 1
	}
	for _, c := range []struct {
		name      string
		coldAfter int
	}{{"never-cold", -1}, {"cooling", 0}} {
		failed := make(chan error, 2)
		p := replicaPairWith(b, tables, failed, func(_ int, cfg *NodeConfig) { cfg.ColdAfter = c.coldAfter })
		pp := newPipe(b)
		b.Run(c.name+"/unchanged", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				p.nodes[0].publish()
			}
		})
		b.Run(c.name+"/one-word", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				idx, _ := p.nodes[0].pageIndex(0x100 + uint64(i%100))
				// From a syscall: a cold replica's write faults.
				pp.kernelWrite(b, p.nodes[0].hostPage(idx)[3*8:], byte(i)|1)
				p.nodes[0].publish()
			}
		})
	}
}
