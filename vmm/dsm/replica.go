package dsm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/uffd"
)

// Replicated page tables (docs/dsm.md, "Replicated page tables").
//
// With nested paging, a processor walking the guest's page tables needs
// every table page writable in the nested page tables (AMD always, Intel
// when EPT accessed/dirty bits are on), so under single-writer coherence
// two slices steal the page tables from each other after every TLB miss.
// Instead, a page the slice knows to be a page table is replicated: every
// slice that walks it holds a writable copy and a twin, the content as
// last published. Before this slice sends any message that can carry its
// guest's causality (a page, a grant, an interrupt, a device access) it
// publishes the words its replicas changed since their twins, as Update
// frames ahead of that message on the same ordered connection; the
// receiver applies them before it reads the message. So no code on
// another slice can learn of an event here without also seeing the
// page-table writes that came before it. Concurrent changes of one word
// are merged with page-table semantics (mergeWord).
//
// With more than two slices one connection no longer orders everything: a
// slice can learn of an event from one slice before another slice's
// updates that came before it have arrived. So every slice counts the
// update frames it has received from each other slice, and before a
// message to slice j it sends a deps frame with those counts whenever
// they grew since its last one to j; j reads nothing more from it until it
// has received as many (causal delivery with vector counts, as in
// ISIS/CBCAST). Waiting happens in j's reader threads, but only for frames
// sent causally earlier, so no wait can close a cycle. A replica's content
// travels with the counts it includes (FlagSeen); a slice joining the
// replicas holds the updates that arrive while its request is in flight
// and applies, once the content is in, those the content does not include.
//
// Tables that stop being tables: a page freed as a table and reused as
// data while replicated would have no single-writer coherence. So when a
// publish shows an entry that linked a replicated table cleared or
// repointed (unlinkedTables), every slice stops classifying that table
// (declassify: its faults move it as data again), and the slice that
// unlinked it asks for it with a write request, which ends the
// replication at the home (the other replicas publish and drop) and makes
// it the single writer (dereplicate). Linux does free kernel tables: a
// debian12 guest across 2 nodes unlinked a last-level vmalloc table.

// Page-table entry bits the merge needs.
const (
	ptePresent  = 1 << 0
	pteAccessed = 1 << 5
	pteDirty    = 1 << 6
	pteAD       = pteAccessed | pteDirty
	pteFrame    = 0x000F_FFFF_FFFF_F000
)

// mergeWord combines two changes, x and y, of one page-table word made
// from the same base value; it is symmetric in x and y, so two slices
// merging each other's changes agree. A processor only sets accessed and
// dirty bits, so a change of those bits alone merges bit by bit, and a
// software change (any other bit) keeps the bits a processor set only if
// the entry still maps the same frame (an entry that was cleared or
// repointed must not get them back). Two different software changes of
// one word conflict: the guest changed one entry on two slices at once,
// which an OS only does under a lock, so it is reported, not guessed.
func mergeWord(base, x, y uint64) (uint64, bool) {
	dx, dy := x^base, y^base
	switch {
	case dx == 0:
		return y, true
	case dy == 0, x == y:
		return x, true
	}
	swx, swy := dx&^pteAD != 0, dy&^pteAD != 0
	switch {
	case !swx && !swy:
		return base ^ (dx | dy), true
	case swx && !swy:
		return withWalkerBits(x, base, y&dy), true
	case swy && !swx:
		return withWalkerBits(y, base, x&dx), true
	}
	return 0, false
}

// withWalkerBits adds the accessed/dirty bits a processor set to the
// software-changed entry sw, if it still maps base's frame.
func withWalkerBits(sw, base, set uint64) uint64 {
	if sw&ptePresent != 0 && sw&pteFrame == base&pteFrame {
		return sw | set&pteAD
	}
	return sw
}

// replicaState is one replicated page's state on this slice.
type replicaState struct {
	twin []byte // the content as last published
	// quiet counts the publishes in a row that found the page unchanged;
	// a cold replica (coldAfter<<heat of them) is write-protected and
	// left out of the diff until a write fault or an update warms it
	// (warmLocked). heat counts its warmings, up to maxHeat.
	quiet int
	cold  bool
	heat  uint8
}

// replicas is a slice's set of replicated pages and their twins.
type replicas struct {
	// sendMu is held by a publish from its diff to its last frame sent:
	// a later publisher, and so the message it precedes, goes after.
	sendMu sync.Mutex
	// mu guards the twins (diffing, applying updates, joining, leaving).
	mu    sync.Mutex
	twins map[int]*replicaState // page index -> its twin and cooling state
	n     atomic.Int32          // len(twins), read without mu

	// Causal delivery (more than two slices). sent counts the update
	// frames this slice has published (each goes to every other slice);
	// recv the frames received from each slice, applied or not; total is
	// their sum, read without mu. arrived (on mu) is signalled when recv
	// grows or the node stops.
	sent    uint64
	recv    []uint64
	total   atomic.Uint64
	arrived *sync.Cond
	// joining: pages with a read or replica request in flight, and the
	// updates received for them meanwhile.
	joining map[int][]heldUpdate
	// depsMu orders deps frames; depsSent[j] is total as of the last deps
	// frame sent to slice j.
	depsMu   sync.Mutex
	depsSent []uint64
	// unlinked: tables the guest unlinked, no longer taken for tables
	// whatever the classifier says (declassify); nUnlinked is its size,
	// read without unlinkMu on every classification.
	unlinkMu  sync.Mutex
	unlinked  map[uint64]bool
	nUnlinked atomic.Int32
}

// maxHeld bounds the updates held for one page (applyUpdate).
const maxHeld = 4096

// heldUpdate is an update frame received for a page this slice was
// joining: seq is its place among its sender's frames.
type heldUpdate struct {
	from  int
	seq   uint64
	words []WordUpdate
}

func (r *replicas) init(n int) {
	r.recv = make([]uint64, n)
	r.depsSent = make([]uint64, n)
	r.arrived = sync.NewCond(&r.mu)
	r.joining = map[int][]heldUpdate{}
}

// seenLocked is how many update frames of each slice this slice's
// replicas include: its own published frames and those it received.
// rep.mu is held.
func (nd *Node) seenLocked() []uint64 {
	seen := slices.Clone(nd.rep.recv)
	seen[nd.id] = nd.rep.sent
	return seen
}

// TableClassifier tells which guest pages are page tables to replicate and
// at which level (4: PML4 … 1: last level; 0: not a table); nil: none are
// (replication off).
type TableClassifier func(pfn uint64) int

// tableLevel is page pfn's level as a replicated page table, or 0.
func (nd *Node) tableLevel(pfn uint64) int {
	f := nd.tables.Load()
	if f == nil {
		return 0
	}
	if nd.rep.nUnlinked.Load() > 0 && nd.isUnlinked(pfn) {
		return 0
	}
	return (*f)(pfn)
}

// isUnlinked reports whether table pfn was declassified.
func (nd *Node) isUnlinked(pfn uint64) bool {
	nd.rep.unlinkMu.Lock()
	defer nd.rep.unlinkMu.Unlock()
	return nd.rep.unlinked[pfn]
}

// declassify stops treating page pfn as a table (the guest unlinked it),
// whatever the classifier says, until Relink.
func (nd *Node) declassify(pfn uint64) {
	nd.rep.unlinkMu.Lock()
	defer nd.rep.unlinkMu.Unlock()
	if nd.rep.unlinked == nil {
		nd.rep.unlinked = map[uint64]bool{}
	}
	if !nd.rep.unlinked[pfn] {
		nd.rep.unlinked[pfn] = true
		nd.rep.nUnlinked.Add(1)
		nd.Stats.Unlinked.Add(1)
	}
}

// Relink undoes declassify for page pfn, found linked as a table again;
// it reports whether pfn had been declassified.
func (nd *Node) Relink(pfn uint64) bool {
	nd.rep.unlinkMu.Lock()
	defer nd.rep.unlinkMu.Unlock()
	if !nd.rep.unlinked[pfn] {
		return false
	}
	delete(nd.rep.unlinked, pfn)
	nd.rep.nUnlinked.Add(-1)
	return true
}

// dereplicate ends the replication of page idx, a table this slice
// unlinked: its write request makes this slice the single writer (the
// home invalidates the other replicas, which publish first).
func (nd *Node) dereplicate(idx int) {
	p := &nd.pages[idx]
	p.mu.Lock()
	if p.st != replica || p.inflight != nil {
		p.mu.Unlock()
		return
	}
	p.inflight = make(chan struct{})
	p.mu.Unlock()
	nd.request(idx, true) // declassified: a plain write request
}

// isTable reports whether page pfn is to be replicated.
func (nd *Node) isTable(pfn uint64) bool { return nd.tableLevel(pfn) != 0 }

// SetTables installs the page-table classifier (nil: replicate nothing
// new). Pages already replicated stay so.
func (nd *Node) SetTables(f TableClassifier) {
	if f == nil {
		nd.tables.Store(nil)
		return
	}
	nd.tables.Store(&f)
}

// snapshot copies a mapped host page with word-atomic loads.
func snapshot(host []byte) []byte {
	out := make([]byte, PageSize)
	for w := 0; w < wordsPerPage; w++ {
		binary.LittleEndian.PutUint64(out[8*w:], loadWord(host, w))
	}
	return out
}

// joinLocked records page idx (mapped, writable) as a replica with twin,
// its content as of seen (update counts per slice; nil: the content is this
// slice's own copy), and applies the updates held while joining that the
// content does not include. p.mu is held.
func (nd *Node) joinLocked(idx int, twin []byte, seen []uint64) {
	nd.rep.mu.Lock()
	if nd.rep.twins == nil {
		nd.rep.twins = map[int]*replicaState{}
	}
	nd.rep.twins[idx] = &replicaState{twin: twin}
	nd.rep.n.Store(int32(len(nd.rep.twins)))
	held := nd.rep.joining[idx]
	delete(nd.rep.joining, idx)
	for _, h := range held {
		if seen != nil && h.seq <= seen[h.from] {
			continue // the content has it
		}
		if !nd.mergeLocked(h.from, idx, twin, h.words) {
			break
		}
	}
	nd.rep.mu.Unlock()
	nd.pages[idx].st = replica
	nd.Stats.Replicated.Add(1)
}

// startJoin notes a read or replica request for page idx in flight: the
// grant may make it a replica, and updates arriving before it are held.
func (nd *Node) startJoin(idx int) {
	nd.rep.mu.Lock()
	if _, ok := nd.rep.joining[idx]; !ok {
		nd.rep.joining[idx] = nil
	}
	nd.rep.mu.Unlock()
}

// endJoin: page idx was granted without a replica; its content includes
// the updates held so far.
func (nd *Node) endJoin(idx int) {
	nd.rep.mu.Lock()
	delete(nd.rep.joining, idx)
	nd.rep.mu.Unlock()
}

// dropReplicaLocked forgets page idx's twin. p.mu is held; the caller
// lifts a cold replica's write protection if the page stays mapped.
func (nd *Node) dropReplicaLocked(idx int) {
	nd.rep.mu.Lock()
	nd.forgetTwinLocked(idx)
	nd.rep.mu.Unlock()
}

// forgetTwinLocked drops page idx's replica bookkeeping. rep.mu is held.
func (nd *Node) forgetTwinLocked(idx int) {
	delete(nd.rep.twins, idx)
	nd.rep.n.Store(int32(len(nd.rep.twins)))
}

// coldAfter is how many publishes in a row must find a replica unchanged
// before it is write-protected and no longer compared (most kernel tables
// change rarely once their accessed bits are set: comparing all of them
// before every message took 9-13% of a debian12 slice's CPU in a node).
const coldAfter = 4

// maxHeat caps a replica's back-off: one written again and again after it
// cooled needs up to coldAfter<<maxHeat (1024) quiet publishes to cool
// again. Without the back-off a debian12 slice spent 9.5% of its CPU
// write-protecting and unprotecting tables that changed every few
// publishes (session 12), on top of the compares cooling was to save.
const maxHeat = 8

// coolLocked write-protects replica idx, unchanged for coldAfter
// publishes: from now on a write to it faults (onFault warms it) and
// diffLocked skips it. rep.mu is held.
func (nd *Node) coolLocked(idx int, r *replicaState) error {
	if err := nd.u.WriteProtect(uffd.Addr(nd.hostPage(idx)), PageSize, true, false); err != nil {
		return err
	}
	r.cold, r.quiet = true, 0
	nd.Stats.Cooled.Add(1)
	return nil
}

// warmLocked lifts a cold replica's write protection (waking whoever
// faulted on it) so that it is compared again. rep.mu is held.
func (nd *Node) warmLocked(idx int) error {
	r := nd.rep.twins[idx]
	if r == nil || !r.cold {
		return nil
	}
	r.cold, r.heat = false, min(r.heat+1, maxHeat)
	return nd.u.WriteProtect(uffd.Addr(nd.hostPage(idx)), PageSize, false, false)
}

// warmReplica is onFault's: a write fault on replica idx (cold, or a
// spurious one) ends with the page writable and the thread woken.
func (nd *Node) warmReplica(idx int) error {
	nd.rep.mu.Lock()
	defer nd.rep.mu.Unlock()
	return nd.warmLocked(idx)
}

// publish sends every word this slice's replicas changed since their
// twins to the other slices, and makes the twins current. Every send of
// the node calls it first.
func (nd *Node) publish() {
	if nd.rep.n.Load() == 0 {
		return
	}
	nd.rep.sendMu.Lock()
	defer nd.rep.sendMu.Unlock()
	nd.rep.mu.Lock()
	frames, err := nd.diffLocked()
	nd.rep.mu.Unlock()
	nd.sendUpdates(frames, err)
}

// publishAndDrop publishes, then stops treating page idx as a replica:
// once its twin is gone no update is applied to it (the caller has
// write-protected it, and a goroutine must never fault on guest RAM).
// p.mu is held.
func (nd *Node) publishAndDrop(idx int) {
	nd.rep.sendMu.Lock()
	defer nd.rep.sendMu.Unlock()
	nd.rep.mu.Lock()
	frames, err := nd.diffLocked()
	nd.forgetTwinLocked(idx)
	nd.rep.mu.Unlock()
	nd.sendUpdates(frames, err)
}

// diffLocked returns the update frames of every word the replicas changed
// since their twins, and makes the twins current. rep.mu is held.
func (nd *Node) diffLocked() ([]Msg, error) {
	var frames []Msg
	for idx, r := range nd.rep.twins {
		if r.cold {
			continue // write-protected: unchanged since it cooled
		}
		twin := r.twin
		host := nd.hostPage(idx)
		// Most replicas are unchanged between two messages: one vectorised
		// compare of the page rules that out (in a virt node the word loop
		// over 114 tables before every message took 11% of a slice's CPU).
		// A walker's write racing with the compare is not before this
		// message, so missing it is as correct as missing it word by word;
		// the next publish takes it.
		if bytes.Equal(host, twin) {
			r.quiet++
			if r.quiet < nd.coldAfter<<r.heat || nd.coldAfter < 0 {
				continue
			}
			// Protect it, then compare once more: a write that came
			// before the protection is published now, later ones fault.
			if err := nd.coolLocked(idx, r); err != nil {
				return nil, err
			}
			if bytes.Equal(host, twin) {
				continue
			}
		} else {
			r.quiet = 0
		}
		var words []WordUpdate
		for w := 0; w < wordsPerPage; w++ {
			v := loadWord(host, w)
			old := binary.LittleEndian.Uint64(twin[8*w:])
			if v != old {
				words = append(words, WordUpdate{Index: uint16(w), Old: old, New: v})
				binary.LittleEndian.PutUint64(twin[8*w:], v)
			}
		}
		pfn := nd.pfn(idx)
		for _, child := range nd.unlinkedTables(pfn, words) {
			nd.log.Info("dsm: the guest unlinked a replicated page table; it moves as data again",
				"table", fmt.Sprintf("%#x", child*PageSize), "parent", fmt.Sprintf("%#x", pfn*PageSize))
			nd.declassify(child)
			if cidx, ok := nd.pageIndex(child); ok {
				// Not here: every send publishes first, under sendMu.
				go nd.dereplicate(cidx)
			}
		}
		for len(words) > 0 {
			k := min(len(words), MaxUpdateWords)
			frames = append(frames, Msg{Type: MsgUpdate, Page: pfn, Words: words[:k]})
			nd.rep.sent++
			words = words[k:]
		}
	}
	return frames, nil
}

// sendUpdates sends the frames of one publish to every other slice (with
// rep.sendMu held, not rep.mu: applying updates never waits for the
// network).
func (nd *Node) sendUpdates(frames []Msg, err error) {
	if err != nil {
		go nd.fail(err)
		return
	}
	for i := range frames {
		nd.Stats.UpdatesSent.Add(1)
		for j := 0; j < nd.n; j++ {
			if j == nd.id {
				continue
			}
			// A frame's base values may include other slices' updates.
			nd.sendDeps(j)
			if err := nd.tr.Send(j, &frames[i]); err != nil && nd.ctx.Err() == nil {
				go nd.fail(fmt.Errorf("slice %d: %w", j, err))
				return
			}
		}
	}
}

// applyUpdate merges another slice's published words into this slice's
// replica of the page (if it holds one: a slice without a replica gets
// the current content when it joins).
func (nd *Node) applyUpdate(from int, m *Msg) {
	idx, ok := nd.pageIndex(m.Page)
	if !ok {
		nd.fail(fmt.Errorf("%w: slice %d sent an update of page %#x outside guest RAM", ErrProtocol, from, m.Page))
		return
	}
	nd.Stats.UpdatesApplied.Add(1)
	nd.rep.mu.Lock()
	defer nd.rep.mu.Unlock()
	if from >= len(nd.rep.recv) {
		return // not a slice of this VM: the transport refuses those
	}
	nd.rep.recv[from]++
	nd.rep.total.Add(1)
	nd.rep.arrived.Broadcast()
	r := nd.rep.twins[idx]
	if r == nil {
		// Held for a request in flight, or for a table page this slice
		// may hold a plain copy of: when the home turns every holder's
		// copy into a replica at once, another holder's first updates
		// can come before this slice's own turn. A grant's content
		// includes every update received before it, so a grant clears
		// them (endJoin); a list that grows past maxHeld belongs to a
		// page this slice does not hold and is dropped.
		held, ok := nd.rep.joining[idx]
		if ok || nd.isTable(m.Page) {
			if len(held) >= maxHeld {
				held = nil
			}
			nd.rep.joining[idx] = append(held, heldUpdate{from: from, seq: nd.rep.recv[from], words: m.Words})
		}
		return
	}
	nd.mergeLocked(from, idx, r.twin, m.Words)
}

// mergeLocked merges slice from's changes of words into replica idx and
// its twin; false if they conflict (the VM is stopping). rep.mu is held.
func (nd *Node) mergeLocked(from, idx int, twin []byte, words []WordUpdate) bool {
	host := nd.hostPage(idx)
	pfn := nd.pfn(idx)
	// A goroutine must not write a write-protected page (it would fault).
	if err := nd.warmLocked(idx); err != nil {
		go nd.fail(err)
		return false
	}
	for _, u := range words {
		w := int(u.Index)
		t := binary.LittleEndian.Uint64(twin[8*w:])
		next := u.New
		if t != u.Old {
			// This slice published its own change of the word from the
			// same base, crossing theirs: both sides compute this merge.
			var ok bool
			if next, ok = mergeWord(u.Old, t, u.New); !ok {
				nd.conflict(from, pfn, w, u.Old, t, u.New)
				return false
			}
		}
		for {
			cur := loadWord(host, w)
			want := next
			if cur != t {
				// An unpublished change here, made from twin value t.
				var ok bool
				if want, ok = mergeWord(t, cur, next); !ok {
					nd.conflict(from, pfn, w, t, cur, next)
					return false
				}
			}
			if casWord(host, w, cur, want) {
				break
			}
		}
		binary.LittleEndian.PutUint64(twin[8*w:], next)
	}
	// The sender unlinked a table: it ends the replication; this slice
	// stops taking the page for a table.
	for _, child := range nd.unlinkedTables(pfn, words) {
		nd.declassify(child)
	}
	return true
}

// sendDeps precedes a message to slice j with this slice's received-update
// counts if they grew since the last ones sent to j (more than two slices:
// with two, the one connection orders everything).
func (nd *Node) sendDeps(j int) {
	if nd.n <= 2 || j == nd.id {
		return
	}
	nd.rep.depsMu.Lock()
	defer nd.rep.depsMu.Unlock()
	if nd.rep.total.Load() == nd.rep.depsSent[j] {
		return
	}
	nd.rep.mu.Lock()
	seen := slices.Clone(nd.rep.recv)
	total := nd.rep.total.Load()
	nd.rep.mu.Unlock()
	if err := nd.tr.Send(j, &Msg{Type: MsgDeps, Seen: seen}); err != nil {
		if nd.ctx.Err() == nil {
			go nd.fail(fmt.Errorf("slice %d: %w", j, err))
		}
		return
	}
	nd.rep.depsSent[j] = total
}

// waitDeps (on slice from's reader) returns once this slice has received
// the update frames counted in seen, from every slice but from itself
// (its own come first on this connection), or the node stops.
func (nd *Node) waitDeps(from int, seen []uint64) {
	if len(seen) != nd.n {
		nd.fail(fmt.Errorf("%w: slice %d sent %d update counts for %d slices", ErrProtocol, from, len(seen), nd.n))
		return
	}
	nd.rep.mu.Lock()
	defer nd.rep.mu.Unlock()
	for k, c := range seen {
		if k == from || k == nd.id {
			continue
		}
		for nd.rep.recv[k] < c {
			if nd.ctx.Err() != nil {
				return
			}
			nd.rep.arrived.Wait()
		}
	}
}

// wakeDepsWaiters lets waitDeps see that the node is stopping.
func (nd *Node) wakeDepsWaiters() {
	go func() {
		nd.rep.mu.Lock()
		nd.rep.arrived.Broadcast()
		nd.rep.mu.Unlock()
	}()
}

// unlinkedTables returns the replicated tables whose entries in words
// (changes of replicated table pfn) were cleared or repointed: the guest
// is freeing them, and a page that leaves page-table use must not stay
// replicated (it would get no single-writer coherence as data).
func (nd *Node) unlinkedTables(pfn uint64, words []WordUpdate) []uint64 {
	const huge = 1 << 7
	level := nd.tableLevel(pfn)
	if level < 2 {
		return nil // last-level entries map pages, not tables
	}
	var out []uint64
	for _, w := range words {
		old := w.Old
		if old&ptePresent == 0 || level < 4 && old&huge != 0 {
			continue
		}
		child := old & pteFrame / PageSize
		if nd.tableLevel(child) == 0 || w.New&ptePresent != 0 && w.New&pteFrame == child*PageSize {
			continue
		}
		out = append(out, child)
	}
	return out
}

func (nd *Node) conflict(from int, pfn uint64, w int, base, here, there uint64) {
	go nd.fail(fmt.Errorf("dsm: replicated page table %#x, entry %d: this slice changed %#x to %#x while slice %d changed it to %#x",
		pfn*PageSize, w, base, here, from, there))
}

// serveReplica serves, at the page's home, a replica request (or a read
// request for a page already replicated): the requester joins the
// replicas. Holders of a page not yet replicated turn their copies into
// replicas (the single writer keeps writing, now as one replica among
// others); a requester without a copy gets the content from a holder.
func (nd *Node) serveReplica(idx int, e *dirEntry, r homeReq, grant *Msg) error {
	bit := uint64(1) << r.from
	grant.Flags = FlagReplica
	if e.replicated && e.copyset&bit != 0 {
		return nil // already holds one (a stale request)
	}
	needData := e.copyset&bit == 0
	ask := e.copyset &^ bit // every holder becomes a replica
	if e.replicated {
		ask = 0 // they already are
	}
	src := -1
	if needData {
		src = nd.pickSource(e.copyset &^ bit)
		ask |= 1 << src
	}
	reps, err := nd.callMany(ask, func(int) Msg { return Msg{Type: MsgFetch, Page: grant.Page, Flags: FlagReplica} })
	if err != nil {
		return err
	}
	e.replicated, e.writer = true, -1
	e.copyset |= bit
	if needData {
		rep := reps[src]
		if !rep.Flags.HasContent() {
			return fmt.Errorf("%w: slice %d sent no content for replicated page %#x", ErrProtocol, src, grant.Page)
		}
		if len(rep.Seen) != nd.n {
			return fmt.Errorf("%w: slice %d sent replicated page %#x with %d update counts for %d slices", ErrProtocol, src, grant.Page, len(rep.Seen), nd.n)
		}
		grant.Flags |= rep.Flags & (FlagData | FlagZero | FlagSeen)
		grant.Data, grant.Seen = rep.Data, rep.Seen
	}
	return nil
}

// replicaContentLocked makes this slice's copy of page idx a replica (if
// it is not one yet) and returns a fetch-reply with the content as
// published: the new replica's twin must match what this slice's later
// updates are based on. p.mu is held.
func (nd *Node) replicaContentLocked(idx int) (Msg, error) {
	p := &nd.pages[idx]
	host := nd.hostPage(idx)
	if p.st != replica {
		var err error
		switch {
		case !p.mapped:
			err = nd.installLocked(idx, nil, false)
		case p.st == shared:
			err = nd.u.WriteProtect(uffd.Addr(host), PageSize, false, false)
		}
		if err != nil {
			return Msg{}, err
		}
		nd.joinLocked(idx, snapshot(host), nil)
	} else {
		nd.publish()
	}
	nd.rep.mu.Lock()
	data := append([]byte(nil), nd.rep.twins[idx].twin...)
	seen := nd.seenLocked()
	nd.rep.mu.Unlock()
	nd.Stats.Fetches.Add(1)
	return Msg{Type: MsgFetchReply, Flags: FlagData | FlagSeen, Data: data, Seen: seen}, nil
}

// onReplicaGrant installs a replica: the content sent (as published by
// its holder, so it is also the twin), or this slice's own copy made
// writable.
func (nd *Node) onReplicaGrant(from, idx int, m *Msg) {
	p := &nd.pages[idx]
	host := nd.hostPage(idx)
	p.mu.Lock()
	var err error
	var twin []byte
	switch {
	case p.st == replica:
		nd.endJoin(idx)
		err = nd.u.Wake(uffd.Addr(host), PageSize) // a stale request
	case m.Flags.HasContent() && (m.Flags&FlagSeen == 0 || len(m.Seen) != nd.n):
		err = fmt.Errorf("%w: slice %d granted a replica of page %#x without the update counts of its content", ErrProtocol, from, m.Page)
	case m.Flags.HasContent():
		if p.mapped {
			if err = uffd.DropPages(host); err == nil {
				p.mapped = false
			}
		}
		twin = make([]byte, PageSize)
		if m.Flags&FlagData != 0 {
			copy(twin, m.Data)
		}
		if err == nil {
			err = nd.installLocked(idx, twin, false)
		}
	case p.st == exclusive && p.mapped:
		// This slice was the only holder (a replica request racing its
		// own ownership): the page simply becomes a replica.
		twin = snapshot(host)
		err = nd.u.Wake(uffd.Addr(host), PageSize)
	case p.st == shared && p.mapped:
		twin = snapshot(host)
		err = nd.u.WriteProtect(uffd.Addr(host), PageSize, false, false)
	case p.st == shared || p.st == exclusive:
		twin = make([]byte, PageSize) // a valid page never touched: zeros
		err = nd.installLocked(idx, nil, false)
	default:
		err = fmt.Errorf("%w: slice %d granted a replica of page %#x without data to a slice holding none", ErrProtocol, from, m.Page)
	}
	if err == nil && twin != nil {
		var counts []uint64 // nil: this slice's own copy, which has every update it received
		if m.Flags.HasContent() {
			counts = m.Seen
		}
		nd.joinLocked(idx, append([]byte(nil), twin...), counts)
	}
	ch := p.inflight
	p.inflight = nil
	p.mu.Unlock()
	if ch != nil {
		close(ch)
	}
	if err != nil && nd.ctx.Err() == nil {
		nd.fail(err)
	}
}

// maxTablePages bounds the page-table walk of classifyTables.
const maxTablePages = 4096

// classifyTables installs the node's page-table classifier: the pages
// of the address spaces the local vCPUs start in.
func (s *sliceRun) classifyTables() error {
	set := TableSet{}
	for _, cr3 := range s.bootCR3 {
		t, err := pageTablePages(s.node, cr3, maxTablePages)
		if err != nil {
			return fmt.Errorf("dsm: reading the guest's page tables at %#x: %w", cr3, err)
		}
		for pfn, l := range t {
			set[pfn] = l
		}
	}
	s.log.Debug("dsm: replicating page tables", "pages", len(set))
	return s.useTables(set, slices.Collect(maps.Keys(set)))
}

// useTables makes set the node's page-table classifier (set is never
// written again) and takes replicas of the pages in take now rather than
// at their first walk: a read-only copy would only be upgraded on the
// walker's first write fault.
func (s *sliceRun) useTables(set TableSet, take []uint64) error {
	s.node.SetTables(func(pfn uint64) int { return set[pfn] })
	for _, pfn := range take {
		if err := s.node.Replicate(pfn); err != nil {
			return fmt.Errorf("dsm: replicating page table %#x: %w", pfn*PageSize, err)
		}
	}
	return nil
}

// Replicate makes this slice hold a replica of page-table page pfn (the
// classifier must name it), unless it already holds it writable: the
// slice that owns it exclusively turns it into a replica when the next
// slice joins.
func (nd *Node) Replicate(pfn uint64) error {
	idx, ok := nd.pageIndex(pfn)
	if !ok {
		return fmt.Errorf("dsm: page %#x is not guest RAM", pfn*PageSize)
	}
	if !nd.isTable(pfn) {
		return fmt.Errorf("dsm: page %#x is not classified as a page table", pfn*PageSize)
	}
	return nd.acquire(idx, true)
}

// kernelTablesEvery is how often a slice looks again for kernel page
// tables created since (new vmalloc and direct-map tables).
const kernelTablesEvery = 2 * time.Second

// classifyKernelTables, on a vCPU's thread at an exit once the guest
// starts its application processors (ReplicateKernelTables), and again
// every kernelTablesEvery, reads the vCPU's CR3 and replicates every
// table of its kernel half not replicated yet, and its root too if that
// is the kernel's own (init_top_pgt; see kernelTablePages). A process's
// CR3 will do for the kernel half: a guest whose application processors
// start after boot (maxcpus=) may never exit on init_top_pgt on the boot
// processor's slice, lazy TLB keeping a process's tables loaded. Before
// the guest starts other CPUs its boot tables (early_top_pgt, freed after
// boot) may still be in use: hence the wait for a startup IPI.
func (s *sliceRun) classifyKernelTables(c *kvm.VCPU) error {
	if !s.ktMu.TryLock() {
		return nil // another vCPU of this slice is at it
	}
	defer s.ktMu.Unlock()
	sregs, err := c.GetSregs()
	if err != nil {
		return err
	}
	const pg, lma = 1 << 31, 1 << 10
	if sregs.CR0&pg == 0 || sregs.EFER&lma == 0 {
		return nil
	}
	set, err := kernelTablePages(s.node, sregs.CR3, maxTablePages)
	if err != nil || len(set) == 0 {
		return nil // no kernel mapping (yet): try at a later exit
	}
	s.ktNext.Store(monotonicNow() + int64(kernelTablesEvery))
	all := maps.Clone(s.ktSet)
	if all == nil {
		all = TableSet{}
	}
	var added []uint64
	for pfn, l := range set {
		// New, or unlinked once and linked again as a table.
		if all[pfn] == 0 || s.node.Relink(pfn) {
			all[pfn] = l
			added = append(added, pfn)
		}
	}
	if len(added) == 0 {
		return nil
	}
	if s.ktSet == nil {
		s.log.Info("dsm: replicating the guest kernel's page tables", "vcpu", c.ID(), "cr3", fmt.Sprintf("%#x", sregs.CR3), "pages", len(all))
	} else {
		s.log.Debug("dsm: more kernel page tables to replicate", "pages", len(added), "total", len(all))
	}
	s.ktSet = all
	return s.useTables(all, added)
}
