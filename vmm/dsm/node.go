// Package dsm is the distributed shared memory layer of a distributed VM:
// every slice (one VMM process running some of the VM's vCPUs) maps the
// whole guest-physical address space, and pages move between slices on
// demand under a single-writer/multiple-reader protocol at 4 KiB
// granularity that gives sequential consistency (Ivy-style, with a
// per-page home directory). Guest accesses are caught with userfaultfd
// (missing and write-protect faults); the VMM's own accesses go through
// Node's memory.Guest methods, which take part in the same protocol.
// See docs/dsm.md for the protocol and wire format.
package dsm

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hpcvm/hpcvm/vmm/memory"
	"github.com/hpcvm/hpcvm/vmm/uffd"
	"golang.org/x/sys/unix"
)

// pstate is a slice's access to one page.
type pstate uint8

const (
	invalid   pstate = iota // no copy: any access faults (page dropped)
	shared                  // read-only copy, write-protected
	exclusive               // the only copy, writable
	replica                 // a writable replica of a page table (replica.go)
)

func (s pstate) String() string { return [...]string{"invalid", "shared", "exclusive", "replica"}[s] }

// usable reports whether a copy in state s serves an access (a write
// needs exclusive or replica).
func (s pstate) usable(write bool) bool {
	return s == exclusive || s == replica || !write && s == shared
}

// page is this slice's view of one guest page.
//
// mapped says whether the host page is populated. A valid page (shared or
// exclusive) that is not mapped holds zeros (slice 0's untouched RAM); it
// is populated with a zero page when first accessed. Invalid pages are
// never mapped. The handlers only ever read host memory of mapped pages:
// a Go goroutine must not fault on registered memory (see docs/dsm.md).
type page struct {
	mu       sync.Mutex
	st       pstate
	mapped   bool
	inflight chan struct{} // closed when this slice's outstanding request is granted
	requests atomic.Int32  // requests this slice sent for the page (HotPages)
	// grantedAt is when this slice was last granted the page exclusive
	// (Node.clock nanoseconds): the start of its hold window.
	grantedAt int64
}

// dirEntry is the home's directory entry for a page: who has copies.
// writer and copyset are only touched by the goroutine serving the page's
// current request (busy), so requests for one page are serialised.
type dirEntry struct {
	mu      sync.Mutex
	busy    bool
	queue   []homeReq
	writer  int    // slice with write access, or -1
	copyset uint64 // slices holding a valid copy (bit i = slice i)
	// replicated: every slice in copyset holds a writable replica
	// (writer is -1).
	replicated bool
}

type homeReq struct {
	from    int
	write   bool
	replica bool // a replica request (a page-table page)
	reqID   uint64
}

type region struct {
	gpa   uint64
	host  []byte
	first int // index of the region's first page
}

// HotPage is a guest page and how many requests this slice sent for it.
type HotPage struct {
	GPA      uint64 `json:"gpa"`
	Requests int64  `json:"requests"`
}

// HotPages returns the n pages this slice requested most often, most
// requested first: where a guest's sharing (or false sharing) is.
func (nd *Node) HotPages(n int) []HotPage {
	var hot []HotPage
	for idx := range nd.pages {
		if c := nd.pages[idx].requests.Load(); c > 0 {
			hot = append(hot, HotPage{GPA: nd.pfn(idx) * PageSize, Requests: int64(c)})
		}
	}
	sort.Slice(hot, func(i, j int) bool {
		if hot[i].Requests != hot[j].Requests {
			return hot[i].Requests > hot[j].Requests
		}
		return hot[i].GPA < hot[j].GPA
	})
	return hot[:min(n, len(hot))]
}

// Stats counts protocol events on one slice.
type Stats struct {
	ReadFaults, WriteFaults atomic.Int64 // guest/VMM faults that needed a request
	Requests                atomic.Int64 // requests sent to homes
	HomeServed              atomic.Int64 // requests served as home
	Invalidations           atomic.Int64 // copies this slice dropped
	Fetches                 atomic.Int64 // copies this slice supplied
	IOForwarded             atomic.Int64 // device accesses sent to slice 0
	IOServed                atomic.Int64 // slice 0: forwarded device accesses performed
	IRQsSent, IRQsReceived  atomic.Int64 // interrupt messages to/from other slices
	Held                    atomic.Int64 // invalidations and fetches deferred by the hold window
	Replicated              atomic.Int64 // pages this slice started holding as replicas
	UpdatesSent             atomic.Int64 // update frames published
	UpdatesApplied          atomic.Int64 // update frames received
	ZeroFilled              atomic.Int64 // untouched pages populated with zeros in runs
	Unlinked                atomic.Int64 // replicated tables the guest unlinked (declassified)
	Cooled                  atomic.Int64 // replicas write-protected as unchanged (coldAfter)
}

// NodeConfig configures a Node.
type NodeConfig struct {
	RAM       *memory.RAM // guest memory; slice 0's must already hold the boot image
	Transport *Transport  // connected mesh, not yet started
	Logger    *slog.Logger
	// OnFail is called once when the node fails (peer lost, protocol
	// error); the node has already released every blocked fault.
	OnFail func(error)
	// Control receives the non-page messages (done, shutdown) on the
	// sender's reader goroutine; it must not block.
	Control func(from int, m *Msg)
	// BusyPoll: the fault reader polls userfaultfd without sleeping for
	// this long before it waits in poll(2) (0: never spins).
	BusyPoll time.Duration
	// Hold is the minimum time a slice keeps a page it was granted for
	// writing before it answers an invalidation or fetch of it (0: none).
	// It bounds how often one page can move: with nested paging every
	// TLB miss on a read-only page-table page is a write fault, and
	// without a hold two slices steal the page tables from each other
	// after every single walk (docs/dsm.md, "Hold window").
	Hold time.Duration
	// Tables classifies page-table pages, which are replicated rather
	// than moved (replica.go); nil: none. SetTables changes it later.
	Tables TableClassifier
	// ZeroRunPages is how many untouched pages a first touch populates
	// at once (0: zeroRunPages; 1: only the touched page).
	ZeroRunPages int
	// ColdAfter is how many publishes in a row must find a replica
	// unchanged before it is write-protected and left out of the diff
	// (0: coldAfter; negative: never).
	ColdAfter int
}

// Node is one slice's coherence engine. It implements memory.Guest.
type Node struct {
	id, n   int
	ram     *memory.RAM
	regs    []region
	pages   []page
	dir     []dirEntry // entries for pages homed here
	u       *uffd.FD
	tr      *Transport
	log     *slog.Logger
	ctx     context.Context
	cancel  context.CancelFunc
	onFail  func(error)
	control func(int, *Msg)
	zero    []byte
	zeroes  []byte // zeroRun pages of zeros
	zeroRun int    // pages per first-touch fill of untouched RAM (NodeConfig.ZeroRunPages)
	// coldAfter: NodeConfig.ColdAfter (negative: replicas never cool).
	coldAfter int
	busyPoll  time.Duration
	hold      time.Duration
	epoch     time.Time // origin of page.grantedAt
	tables    atomic.Pointer[TableClassifier]
	rep       replicas

	pmu     sync.Mutex
	pending map[uint64]chan Msg
	seq     atomic.Uint64

	failOnce sync.Once
	err      error // set once under failOnce
	failed   atomic.Bool
	wg       sync.WaitGroup

	Stats Stats
}

var _ memory.Guest = (*Node)(nil)

// NewNode registers the RAM with userfaultfd, sets the initial ownership
// (slice 0 owns every page; the pages its loader populated are mapped) and
// starts serving faults and messages.
func NewNode(cfg NodeConfig) (*Node, error) {
	nd, err := newNode(cfg)
	if err != nil {
		return nil, err
	}
	if err := nd.start(); err != nil {
		return nil, err
	}
	return nd, nil
}

// newNode is NewNode without starting: the caller can publish the node
// (handlers it configured may use it) before any message arrives.
func newNode(cfg NodeConfig) (*Node, error) {
	tr := cfg.Transport
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	nd := &Node{id: tr.ID(), n: tr.N(), ram: cfg.RAM, tr: tr, log: cfg.Logger.With("slice", tr.ID()),
		onFail: cfg.OnFail, control: cfg.Control, zero: make([]byte, PageSize), pending: map[uint64]chan Msg{},

		busyPoll: cfg.BusyPoll, hold: cfg.Hold, epoch: time.Now()}
	nd.zeroRun = cfg.ZeroRunPages
	if nd.zeroRun <= 0 {
		nd.zeroRun = zeroRunPages
	}
	nd.zeroes = make([]byte, nd.zeroRun*PageSize)
	nd.coldAfter = cmp.Or(cfg.ColdAfter, coldAfter)
	nd.rep.init(nd.n)
	nd.ctx, nd.cancel = context.WithCancel(context.Background())
	nd.SetTables(cfg.Tables)
	npages := 0
	for _, r := range cfg.RAM.Regions() {
		nd.regs = append(nd.regs, region{gpa: r.GPA, host: r.Host, first: npages})
		npages += len(r.Host) / PageSize
	}
	nd.pages = make([]page, npages)
	nd.dir = make([]dirEntry, npages)
	for i := range nd.dir {
		nd.dir[i].writer = 0
		nd.dir[i].copyset = 1
	}
	for _, r := range nd.regs {
		// THP would populate 2 MiB at once behind the protocol's back.
		if err := unix.Madvise(r.host, unix.MADV_NOHUGEPAGE); err != nil {
			return nil, fmt.Errorf("dsm: madvise(NOHUGEPAGE) on guest RAM at %#x: %w", r.gpa, err)
		}
		var resident []byte
		if nd.id == 0 {
			resident = make([]byte, len(r.host)/PageSize)
			if err := mincore(r.host, resident); err != nil {
				return nil, fmt.Errorf("dsm: mincore on guest RAM at %#x: %w", r.gpa, err)
			}
		}
		for i := 0; i < len(r.host)/PageSize; i++ {
			p := &nd.pages[r.first+i]
			if nd.id == 0 {
				p.st = exclusive
				p.mapped = resident[i]&1 != 0
			} else if err := uffd.DropPages(r.host[i*PageSize : (i+1)*PageSize]); err != nil {
				return nil, err
			}
		}
	}
	u, err := uffd.Open(uffd.FeaturePagefaultFlagWP, uffd.FeatureThreadID)
	if err != nil {
		return nil, err
	}
	nd.u = u
	for _, r := range nd.regs {
		if err := u.Register(uffd.Addr(r.host), uint64(len(r.host)), uffd.ModeMissing|uffd.ModeWP); err != nil {
			u.Close()
			return nil, err
		}
	}
	return nd, nil
}

// start begins serving messages and faults.
func (nd *Node) start() error {
	if err := nd.tr.Start(nd); err != nil {
		nd.u.Close()
		return err
	}
	nd.wg.Add(1)
	go nd.faultLoop()
	return nil
}

// Err returns the error the node failed with, if any.
func (nd *Node) Err() error {
	if !nd.failed.Load() {
		return nil
	}
	return nd.err
}

// fail stops the node: pending waits abort and the userfaultfd is closed,
// which wakes every thread blocked on a fault (they then see plain
// anonymous memory; the VM is being stopped).
func (nd *Node) fail(err error) {
	nd.failOnce.Do(func() {
		nd.err = err
		nd.failed.Store(true)
		nd.log.Error("dsm node failed", "err", err)
		if nd.onFail != nil {
			nd.onFail(err)
		}
		nd.cancel()
		nd.wakeDepsWaiters()
		nd.u.Close()
	})
}

// releaseFaults closes the userfaultfd, so every thread blocked in a fault
// on guest RAM goes on (seeing plain anonymous memory), without marking
// the node failed: for a VM that is stopping.
func (nd *Node) releaseFaults() {
	nd.failOnce.Do(func() {
		nd.cancel()
		nd.wakeDepsWaiters()
		nd.u.Close()
	})
}

// Close stops serving faults. The machine must have stopped.
func (nd *Node) Close() error {
	nd.releaseFaults()
	nd.wg.Wait()
	return nil
}

// Size is the guest RAM size.
func (nd *Node) Size() uint64 { return nd.ram.Size() }

// locate maps a guest-physical address to its page index and the host
// bytes from gpa to the end of its page.
func (nd *Node) locate(gpa uint64) (int, []byte, bool) {
	for _, r := range nd.regs {
		if gpa >= r.gpa && gpa-r.gpa < uint64(len(r.host)) {
			off := gpa - r.gpa
			idx := r.first + int(off/PageSize)
			end := (off/PageSize + 1) * PageSize
			return idx, r.host[off:end], true
		}
	}
	return 0, nil, false
}

// pageIndex maps a guest page frame number from the wire to a page index.
func (nd *Node) pageIndex(pfn uint64) (int, bool) {
	if pfn > (1<<52)-1 {
		return 0, false
	}
	idx, _, ok := nd.locate(pfn * PageSize)
	return idx, ok
}

func (nd *Node) pfn(idx int) uint64 {
	for i := len(nd.regs) - 1; i >= 0; i-- {
		if idx >= nd.regs[i].first {
			return nd.regs[i].gpa/PageSize + uint64(idx-nd.regs[i].first)
		}
	}
	panic("dsm: bad page index")
}

func (nd *Node) hostPage(idx int) []byte {
	r := nd.regionOf(idx)
	off := (idx - r.first) * PageSize
	return r.host[off : off+PageSize]
}

func (nd *Node) home(pfn uint64) int { return int(pfn % uint64(nd.n)) }

func (nd *Node) send(to int, m *Msg) {
	if to != nd.id {
		nd.publish()
		nd.sendDeps(to)
	}
	if err := nd.tr.Send(to, m); err != nil && nd.ctx.Err() == nil {
		nd.fail(fmt.Errorf("slice %d: %w", to, err))
	}
}

// faultLoop reads userfaultfd events and resolves each on its own
// goroutine (a fault may wait for a remote slice).
func (nd *Node) faultLoop() {
	defer nd.wg.Done()
	evs := make([]uffd.Event, 64)
	for {
		n, err := nd.u.ReadEventsSpin(evs, nd.busyPoll)
		if err != nil {
			if !errors.Is(err, uffd.ErrClosed) && nd.ctx.Err() == nil {
				nd.fail(err)
			}
			return
		}
		for _, ev := range evs[:n] {
			if !ev.Pagefault() {
				continue
			}
			idx, ok := nd.hostIndex(ev.Address)
			if !ok {
				nd.fail(fmt.Errorf("dsm: fault outside guest RAM: %v", ev))
				return
			}
			if err := nd.onFault(idx, ev.Write() || ev.WP()); err != nil {
				if nd.ctx.Err() == nil {
					nd.fail(err)
				}
				return
			}
		}
	}
}

func (nd *Node) hostIndex(addr uint64) (int, bool) {
	for _, r := range nd.regs {
		base := uint64(uffd.Addr(r.host))
		if addr >= base && addr-base < uint64(len(r.host)) {
			return r.first + int((addr-base)/PageSize), true
		}
	}
	return 0, false
}

// onFault handles one fault without blocking: if the page is already
// accessible it is populated (if needed) and the thread woken; otherwise
// a request goes to the page's home (unless one is in flight) and the
// grant's installation wakes the thread. A thread that wanted more than
// the grant gave (a write after a read grant) faults again.
func (nd *Node) onFault(idx int, write bool) error {
	p := &nd.pages[idx]
	p.mu.Lock()
	if p.st.usable(write) {
		var err error
		switch {
		case p.st == replica && write:
			err = nd.warmReplica(idx) // a cold replica: lift its protection
		case p.mapped:
		case p.st == exclusive:
			err = nd.installZeroRunLocked(idx)
		default:
			err = nd.installLocked(idx, nil, p.st == shared)
		}
		p.mu.Unlock()
		if err != nil {
			return err
		}
		return nd.u.Wake(uffd.Addr(nd.hostPage(idx)), PageSize)
	}
	if p.inflight != nil {
		p.mu.Unlock()
		return nil
	}
	p.inflight = make(chan struct{})
	p.mu.Unlock()
	nd.request(idx, write)
	return nil
}

func (nd *Node) request(idx int, write bool) {
	nd.pages[idx].requests.Add(1)
	m := Msg{Type: MsgReadReq, ReqID: nd.seq.Add(1), Page: nd.pfn(idx)}
	if nd.isTable(m.Page) {
		// Read or write: a page-table page is replicated (replica.go).
		m.Type = MsgReplicaReq
	}
	if write {
		if m.Type != MsgReplicaReq {
			m.Type = MsgWriteReq
		}
		nd.Stats.WriteFaults.Add(1)
	} else {
		nd.Stats.ReadFaults.Add(1)
	}
	nd.Stats.Requests.Add(1)
	if m.Type != MsgWriteReq && nd.tables.Load() != nil {
		nd.startJoin(idx) // the grant may be a replica
	}
	nd.send(nd.home(m.Page), &m)
}

// acquire returns once this slice holds page idx shared (or exclusive if
// write). Concurrent acquirers of one page share one request.
func (nd *Node) acquire(idx int, write bool) error {
	p := &nd.pages[idx]
	for {
		p.mu.Lock()
		if p.st.usable(write) {
			p.mu.Unlock()
			return nil
		}
		if ch := p.inflight; ch != nil {
			p.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-nd.ctx.Done():
				return nd.ctxErr()
			}
		}
		ch := make(chan struct{})
		p.inflight = ch
		p.mu.Unlock()
		nd.request(idx, write)
		select {
		case <-ch:
		case <-nd.ctx.Done():
			return nd.ctxErr()
		}
	}
}

func (nd *Node) ctxErr() error {
	if err := nd.Err(); err != nil {
		return err
	}
	return errors.New("dsm: node closed")
}

// zeroRunPages is how many pages a first touch of untouched RAM populates
// at once (an aligned window, 256 KiB): slice 0 owns every page at start,
// and a booting guest touches its RAM in runs, so one UFFDIO_COPY then
// stands for up to 64 userfaultfd round trips through this process. The
// extra pages cost host memory only where the guest touched a neighbour.
const zeroRunPages = 64

// installZeroRunLocked populates page idx, exclusive and not mapped (so
// zeros), together with its neighbours in idx's aligned zeroRun window
// that are exclusive and not mapped too, with one writable UFFDIO_COPY of
// zeros. p.mu of idx is held; a neighbour whose lock is busy ends the run
// on its side (TryLock: no lock order to keep).
func (nd *Node) installZeroRunLocked(idx int) error {
	w := nd.zeroRun
	if w <= 1 {
		return nd.installLocked(idx, nil, false)
	}
	r := nd.regionOf(idx)
	lo := max(r.first, idx-idx%w)
	hi := min(r.first+len(r.host)/PageSize, idx-idx%w+w)
	take := func(j int) bool {
		q := &nd.pages[j]
		if !q.mu.TryLock() {
			return false
		}
		if q.st != exclusive || q.mapped {
			q.mu.Unlock()
			return false
		}
		return true
	}
	a, b := idx, idx+1 // the run is [a, b)
	for a > lo && take(a-1) {
		a--
	}
	for b < hi && take(b) {
		b++
	}
	defer func() {
		for j := a; j < b; j++ {
			if j != idx {
				nd.pages[j].mu.Unlock()
			}
		}
	}()
	off := (a - r.first) * PageSize
	// No wake: the caller wakes the faulting thread once the run's state
	// is recorded; faults on the neighbours are woken as their events come.
	err := nd.u.Copy(uffd.Addr(r.host[off:]), nd.zeroes[:(b-a)*PageSize], false, true)
	if errors.Is(err, uffd.ErrExist) && b-a > 1 {
		// A page of the run was populated behind our back (should not
		// happen). Keep what such a neighbour holds, fill the others one
		// by one (installLocked replaces page idx itself, as before).
		resident := make([]byte, b-a)
		if err := mincore(r.host[off:off+(b-a)*PageSize], resident); err != nil {
			return fmt.Errorf("dsm: mincore on guest RAM: %w", err)
		}
		for j := a; j < b; j++ {
			if j != idx && resident[j-a]&1 != 0 {
				nd.log.Warn("dsm: page unexpectedly present, kept", "pfn", nd.pfn(j))
				nd.pages[j].mapped = true
			} else if err := nd.installLocked(j, nil, false); err != nil {
				return err
			}
		}
		return nil
	}
	if err != nil {
		return err
	}
	for j := a; j < b; j++ {
		nd.pages[j].mapped = true
	}
	nd.Stats.ZeroFilled.Add(int64(b - a))
	return nil
}

// regionOf returns the region holding page idx.
func (nd *Node) regionOf(idx int) region {
	for i := len(nd.regs) - 1; i >= 0; i-- {
		if idx >= nd.regs[i].first {
			return nd.regs[i]
		}
	}
	panic("dsm: bad page index")
}

// installLocked populates page idx with data (nil: zeros), write-protected
// if wp. p.mu is held.
func (nd *Node) installLocked(idx int, data []byte, wp bool) error {
	host := nd.hostPage(idx)
	if data == nil {
		data = nd.zero
	}
	err := nd.u.Copy(uffd.Addr(host), data, wp, false)
	if errors.Is(err, uffd.ErrExist) {
		// Populated behind our back (should not happen): replace it.
		nd.log.Warn("dsm: page unexpectedly present, replacing", "pfn", nd.pfn(idx))
		if err = uffd.DropPages(host); err == nil {
			err = nd.u.Copy(uffd.Addr(host), data, wp, false)
		}
	}
	if err != nil {
		return err
	}
	nd.pages[idx].mapped = true
	return nil
}

// content returns a copy of mapped page idx's data (nil and FlagZero for
// zeros). p.mu is held and the page is write-protected or exclusive here.
func (nd *Node) contentLocked(idx int) ([]byte, PageFlags) {
	if !nd.pages[idx].mapped {
		return nil, FlagZero
	}
	host := nd.hostPage(idx)
	if bytes.Equal(host, nd.zero) {
		return nil, FlagZero
	}
	return append([]byte(nil), host...), FlagData
}

// Deliver handles one message (transport.Handler).
func (nd *Node) Deliver(from int, m *Msg) {
	if isPageMsg(m.Type) {
		idx, ok := nd.pageIndex(m.Page)
		if !ok {
			nd.fail(fmt.Errorf("%w: slice %d sent %v for page %#x outside guest RAM", ErrProtocol, from, m.Type, m.Page))
			return
		}
		switch m.Type {
		case MsgReadReq, MsgWriteReq, MsgReplicaReq:
			if nd.home(m.Page) != nd.id {
				nd.fail(fmt.Errorf("%w: slice %d sent %v for page %#x homed on slice %d", ErrProtocol, from, m.Type, m.Page, nd.home(m.Page)))
				return
			}
			nd.enqueue(idx, homeReq{from: from, write: m.Type == MsgWriteReq, replica: m.Type == MsgReplicaReq, reqID: m.ReqID})
		case MsgFetch:
			nd.onFetch(from, idx, m)
		case MsgInvalidate:
			nd.onInvalidate(from, idx, m)
		case MsgGrant:
			nd.onGrant(from, idx, m)
		case MsgFetchReply, MsgInvAck:
			nd.reply(from, m)
		}
		return
	}
	if m.Type == MsgIOReply || m.Type == MsgClockReply {
		nd.reply(from, m)
		return
	}
	if m.Type == MsgUpdate {
		nd.applyUpdate(from, m)
		return
	}
	if m.Type == MsgDeps {
		nd.waitDeps(from, m.Seen)
		return
	}
	if nd.control != nil {
		nd.control(from, m)
	}
}

// reply hands a reply to the goroutine waiting for it (callMany, Call).
func (nd *Node) reply(from int, m *Msg) {
	r := *m
	r.Data = nil
	if len(m.Data) > 0 {
		r.Data = append([]byte(nil), m.Data...)
	}
	nd.pmu.Lock()
	ch := nd.pending[m.ReqID]
	delete(nd.pending, m.ReqID)
	nd.pmu.Unlock()
	if ch == nil {
		nd.fail(fmt.Errorf("%w: slice %d sent an unexpected %v (request %d)", ErrProtocol, from, m.Type, m.ReqID))
		return
	}
	ch <- r
}

// Call sends m (given a fresh request id) to slice `to` and waits for the
// reply carrying that id, or until abort is closed or the node fails.
func (nd *Node) Call(to int, m *Msg, abort <-chan struct{}) (Msg, error) {
	m.ReqID = nd.seq.Add(1)
	ch := make(chan Msg, 1)
	nd.pmu.Lock()
	nd.pending[m.ReqID] = ch
	nd.pmu.Unlock()
	if to != nd.id {
		nd.publish()
		nd.sendDeps(to)
	}
	forget := func() {
		nd.pmu.Lock()
		delete(nd.pending, m.ReqID)
		nd.pmu.Unlock()
	}
	if err := nd.tr.Send(to, m); err != nil {
		forget()
		return Msg{}, fmt.Errorf("slice %d: %w", to, err)
	}
	// On abort the entry stays: a late reply lands in the buffered
	// channel instead of looking unexpected.
	select {
	case r := <-ch:
		return r, nil
	case <-abort:
		return Msg{}, errAborted
	case <-nd.ctx.Done():
		return Msg{}, nd.ctxErr()
	}
}

// errAborted: a Call's abort channel closed (the machine is stopping).
var errAborted = errors.New("dsm: call aborted")

// PeerFailed is called by the transport when a peer is lost.
func (nd *Node) PeerFailed(peer int, err error) { nd.fail(err) }

func (nd *Node) onFetch(from, idx int, m *Msg) {
	asReplica := m.Flags&FlagReplica != 0 // keeps the page here: no hold
	if !asReplica && nd.deferHeld(idx, m, func(m *Msg) { nd.onFetch(from, idx, m) }) {
		return
	}
	r, err := nd.fetchLocal(idx, asReplica)
	if err != nil {
		nd.fail(fmt.Errorf("slice %d asked for page %#x: %w", from, m.Page, err))
		return
	}
	r.ReqID, r.Page = m.ReqID, m.Page
	nd.send(from, &r)
}

// fetchLocal answers a fetch for page idx: this slice keeps a shared copy
// (write-protected before it is copied, so no write is lost) and returns
// the fetch-reply with its content. asReplica: it keeps a writable
// replica instead and returns the content as published.
func (nd *Node) fetchLocal(idx int, asReplica bool) (Msg, error) {
	p := &nd.pages[idx]
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.st == invalid {
		return Msg{}, fmt.Errorf("%w: this slice does not hold the page", ErrProtocol)
	}
	if asReplica {
		return nd.replicaContentLocked(idx)
	}
	if p.st == replica {
		return Msg{}, fmt.Errorf("%w: asked to downgrade a replicated page", ErrProtocol)
	}
	if p.st == exclusive && p.mapped {
		if err := nd.u.WriteProtect(uffd.Addr(nd.hostPage(idx)), PageSize, true, false); err != nil {
			return Msg{}, err
		}
	}
	p.st = shared
	data, flags := nd.contentLocked(idx)
	nd.Stats.Fetches.Add(1)
	return Msg{Type: MsgFetchReply, Flags: flags, Data: data}, nil
}

func (nd *Node) onInvalidate(from, idx int, m *Msg) {
	if nd.deferHeld(idx, m, func(m *Msg) { nd.onInvalidate(from, idx, m) }) {
		return
	}
	r, err := nd.invalidateLocal(idx, m.Flags&FlagWantData != 0)
	if err != nil {
		nd.fail(err)
		return
	}
	r.ReqID, r.Page = m.ReqID, m.Page
	nd.send(from, &r)
}

// invalidateLocal drops this slice's copy of page idx and returns the
// inv-ack (with the content if wantData).
func (nd *Node) invalidateLocal(idx int, wantData bool) (Msg, error) {
	p := &nd.pages[idx]
	reply := Msg{Type: MsgInvAck}
	p.mu.Lock()
	defer p.mu.Unlock()
	host := nd.hostPage(idx)
	if p.st == replica {
		// Stop this slice's writes, publish them, then let go.
		if err := nd.u.WriteProtect(uffd.Addr(host), PageSize, true, false); err != nil {
			return Msg{}, err
		}
		nd.publishAndDrop(idx)
		p.st = shared // write-protected now
	}
	if wantData {
		if p.st == exclusive && p.mapped {
			if err := nd.u.WriteProtect(uffd.Addr(host), PageSize, true, false); err != nil {
				return Msg{}, err
			}
		}
		reply.Data, reply.Flags = nd.contentLocked(idx)
	}
	if p.mapped {
		if err := uffd.DropPages(host); err != nil {
			return Msg{}, err
		}
		p.mapped = false
	}
	p.st = invalid
	nd.Stats.Invalidations.Add(1)
	return reply, nil
}

func (nd *Node) onGrant(from, idx int, m *Msg) {
	if m.Flags&FlagReplica != 0 {
		nd.onReplicaGrant(from, idx, m)
		return
	}
	p := &nd.pages[idx]
	excl := m.Flags&FlagExclusive != 0
	if nd.tables.Load() != nil {
		nd.endJoin(idx)
	}
	p.mu.Lock()
	if p.st == replica {
		// De-replicated: this slice's copy is the only one left.
		nd.dropReplicaLocked(idx)
		p.st = exclusive
		if !excl {
			err := fmt.Errorf("%w: slice %d granted a shared copy of replicated page %#x", ErrProtocol, from, m.Page)
			p.mu.Unlock()
			nd.fail(err)
			return
		}
	}
	var err error
	woke := true // UFFDIO_COPY and lifting write protection wake the faulting threads
	switch {
	case m.Flags.HasContent():
		if p.mapped {
			if err = uffd.DropPages(nd.hostPage(idx)); err == nil {
				p.mapped = false
			}
		}
		if err == nil {
			var data []byte // nil: zeros
			if m.Flags&FlagData != 0 {
				data = m.Data
			}
			err = nd.installLocked(idx, data, !excl)
		}
	case excl && p.mapped:
		// Upgrade of our shared copy: lifting the protection wakes the
		// threads blocked in write-protect faults.
		err = nd.u.WriteProtect(uffd.Addr(nd.hostPage(idx)), PageSize, false, false)
	case p.st == invalid:
		err = fmt.Errorf("%w: slice %d granted page %#x without data to a slice holding none", ErrProtocol, from, m.Page)
	default:
		woke = false
	}
	if excl {
		p.st = exclusive
		p.grantedAt = nd.now()
	} else if p.st != exclusive {
		p.st = shared
	}
	if err == nil && !p.mapped {
		err = nd.installLocked(idx, nil, p.st == shared) // valid zero page
	}
	ch := p.inflight
	p.inflight = nil
	p.mu.Unlock()
	if ch != nil {
		close(ch)
	}
	if err == nil && !woke {
		// A grant that changed nothing (a stale request): wake anyone
		// who faulted meanwhile, without a redundant syscall otherwise.
		err = nd.u.Wake(uffd.Addr(nd.hostPage(idx)), PageSize)
	}
	if err != nil && nd.ctx.Err() == nil {
		nd.fail(err)
	}
}

func (nd *Node) now() int64 { return int64(time.Since(nd.epoch)) }

// holdLeft returns how much of page idx's hold window is left on this
// slice (0 if none: no hold configured, or the page is not exclusive here).
func (nd *Node) holdLeft(idx int) time.Duration {
	if nd.hold <= 0 {
		return 0
	}
	p := &nd.pages[idx]
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.st != exclusive {
		return 0
	}
	return max(0, nd.hold-time.Duration(nd.now()-p.grantedAt))
}

// deferHeld postpones a fetch or invalidation of a page still in its hold
// window: handle runs again with a copy of m once the window ends. The
// home serves one request per page at a time and waits for this answer,
// so nothing else for the page arrives meanwhile.
func (nd *Node) deferHeld(idx int, m *Msg, handle func(*Msg)) bool {
	d := nd.holdLeft(idx)
	if d <= 0 {
		return false
	}
	nd.Stats.Held.Add(1)
	c := *m
	c.Data = nil // fetch and invalidate carry no data
	time.AfterFunc(d, func() {
		if nd.ctx.Err() == nil {
			handle(&c)
		}
	})
	return true
}

// enqueue queues a request at the page's home; requests for one page are
// served one at a time, in arrival order, by one goroutine.
func (nd *Node) enqueue(idx int, r homeReq) {
	e := &nd.dir[idx]
	e.mu.Lock()
	if e.busy {
		e.queue = append(e.queue, r)
		e.mu.Unlock()
		return
	}
	e.busy = true
	e.mu.Unlock()
	if nd.localOnly(idx, e, r) {
		// Common case: no remote slice to wait for, so serve on this
		// (reader) goroutine and save a goroutine handoff.
		var more bool
		if r, more = nd.serveOne(idx, e, r); !more {
			return
		}
	}
	go func() {
		for more := true; more; {
			r, more = nd.serveOne(idx, e, r)
		}
	}()
}

// serveOne serves r at the page's home and returns the page's next queued
// request, or false when there is none (the entry is then idle) or serving
// failed (the node then failed).
func (nd *Node) serveOne(idx int, e *dirEntry, r homeReq) (homeReq, bool) {
	if err := nd.serve(idx, r); err != nil {
		if nd.ctx.Err() == nil {
			nd.fail(err)
		}
		return homeReq{}, false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.queue) == 0 {
		e.busy = false
		return homeReq{}, false
	}
	r = e.queue[0]
	e.queue = e.queue[1:]
	return r, true
}

// localOnly reports whether serving r needs no reply from another slice.
// Only the goroutine owning the busy entry calls it.
// A request that takes this slice's own held page away is not local: it
// has to wait for the hold to end, which a reader goroutine must not do.
func (nd *Node) localOnly(idx int, e *dirEntry, r homeReq) bool {
	self := uint64(1) << nd.id
	bit := uint64(1) << r.from
	if e.replicated && r.write && !r.replica {
		// Ends the replication (a slice that does not take the page
		// for a table, or a table its guest unlinked): the other
		// replicas must be invalidated first.
		return e.copyset&^bit&^self == 0
	}
	if r.replica || e.replicated {
		return e.replicated && e.copyset&bit != 0 // a stale request
	}
	if e.writer == nd.id && r.from != nd.id && nd.holdLeft(idx) > 0 {
		return false
	}
	switch {
	case e.writer == r.from, !r.write && e.copyset&bit != 0:
		return true
	case !r.write:
		return e.writer == nd.id || e.writer < 0 && e.copyset&self != 0
	default:
		return e.copyset&^bit&^self == 0
	}
}

// pickSource chooses the slice to copy a page from: this slice if it has
// a copy (no network hop), else the lowest-numbered holder.
func (nd *Node) pickSource(set uint64) int {
	if set&(1<<nd.id) != 0 {
		return nd.id
	}
	return bits.TrailingZeros64(set)
}

// serve runs one request at the page's home.
func (nd *Node) serve(idx int, r homeReq) error {
	e := &nd.dir[idx]
	pfn := nd.pfn(idx)
	bit := uint64(1) << r.from
	grant := Msg{Type: MsgGrant, ReqID: r.reqID, Page: pfn}
	nd.Stats.HomeServed.Add(1)
	if e.replicated && r.write && !r.replica {
		// A write fault on a replicated page by a slice that does not
		// take it for a page table: back to a single writer (the
		// replicas publish and drop in invalidateLocal).
		e.replicated = false
	}
	switch {
	case r.replica || e.replicated:
		if err := nd.serveReplica(idx, e, r, &grant); err != nil {
			return err
		}
	case e.writer == r.from:
		grant.Flags = FlagExclusive // already the owner (a stale request)
	case !r.write && e.copyset&bit != 0:
		// Already holds a copy.
	case !r.write:
		src := e.writer
		if src < 0 {
			src = nd.pickSource(e.copyset)
		}
		reps, err := nd.callMany(1<<src, func(int) Msg { return Msg{Type: MsgFetch, Page: pfn} })
		if err != nil {
			return err
		}
		e.writer = -1
		e.copyset |= bit
		grant.Flags, grant.Data = reps[src].Flags&(FlagData|FlagZero), reps[src].Data
	default:
		needData := e.copyset&bit == 0
		others := e.copyset &^ bit
		src := -1
		if needData {
			src = nd.pickSource(others)
		}
		reps, err := nd.callMany(others, func(s int) Msg {
			m := Msg{Type: MsgInvalidate, Page: pfn}
			if s == src {
				m.Flags = FlagWantData
			}
			return m
		})
		if err != nil {
			return err
		}
		e.writer = r.from
		e.copyset = bit
		grant.Flags = FlagExclusive
		if needData {
			rep := reps[src]
			if !rep.Flags.HasContent() {
				return fmt.Errorf("%w: slice %d invalidated page %#x without sending its content", ErrProtocol, src, pfn)
			}
			grant.Flags |= rep.Flags & (FlagData | FlagZero)
			grant.Data = rep.Data
		}
	}
	nd.send(r.from, &grant)
	return nil
}

// callMany sends one request to every slice in set and waits for all
// replies.
func (nd *Node) callMany(set uint64, mk func(slice int) Msg) (map[int]Msg, error) {
	type call struct {
		slice int
		ch    chan Msg
	}
	var calls []call
	self := false
	for s := set; s != 0; s &= s - 1 {
		slice := bits.TrailingZeros64(s)
		if slice == nd.id {
			self = true
			continue
		}
		m := mk(slice)
		m.ReqID = nd.seq.Add(1)
		ch := make(chan Msg, 1)
		nd.pmu.Lock()
		nd.pending[m.ReqID] = ch
		nd.pmu.Unlock()
		calls = append(calls, call{slice, ch})
		nd.send(slice, &m)
	}
	out := make(map[int]Msg, len(calls)+1)
	if self {
		// This slice's own part, done directly while the others work
		// (after its hold window: callMany never runs on a reader
		// goroutine when the hold has time left, see localOnly).
		m := mk(nd.id)
		idx, _ := nd.pageIndex(m.Page)
		if d := nd.holdLeft(idx); d > 0 && m.Flags&FlagReplica == 0 {
			nd.Stats.Held.Add(1)
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-nd.ctx.Done():
				t.Stop()
				return nil, nd.ctxErr()
			}
		}
		var r Msg
		var err error
		if m.Type == MsgFetch {
			r, err = nd.fetchLocal(idx, m.Flags&FlagReplica != 0)
		} else {
			r, err = nd.invalidateLocal(idx, m.Flags&FlagWantData != 0)
		}
		if err != nil {
			return nil, err
		}
		out[nd.id] = r
	}
	for _, c := range calls {
		select {
		case r := <-c.ch:
			out[c.slice] = r
		case <-nd.ctx.Done():
			return nil, nd.ctxErr()
		}
	}
	return out, nil
}

// ReadAt reads guest memory coherently (acquiring shared copies).
func (nd *Node) ReadAt(b []byte, off int64) (int, error) { return nd.access(b, off, false) }

// WriteAt writes guest memory coherently (acquiring exclusive ownership).
func (nd *Node) WriteAt(b []byte, off int64) (int, error) { return nd.access(b, off, true) }

func (nd *Node) access(b []byte, off int64, write bool) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("dsm: negative guest address %d", off)
	}
	done := 0
	for done < len(b) {
		gpa := uint64(off) + uint64(done)
		idx, host, ok := nd.locate(gpa)
		if !ok {
			return done, fmt.Errorf("dsm: guest address %#x is not RAM", gpa)
		}
		n := min(len(host), len(b)-done)
		for {
			if err := nd.acquire(idx, write); err != nil {
				return done, err
			}
			p := &nd.pages[idx]
			p.mu.Lock()
			if p.st.usable(write) {
				// Holding p.mu keeps the copy from being invalidated while
				// this goroutine touches it; it is populated first so the
				// copy itself never faults.
				if !p.mapped {
					if err := nd.installLocked(idx, nil, p.st == shared); err != nil {
						p.mu.Unlock()
						return done, err
					}
				}
				if write && p.st == replica {
					// A cold replica is write-protected: this copy must not fault.
					if err := nd.warmReplica(idx); err != nil {
						p.mu.Unlock()
						return done, err
					}
				}
				if write {
					copy(host, b[done:done+n])
				} else {
					copy(b[done:done+n], host)
				}
				p.mu.Unlock()
				break
			}
			p.mu.Unlock() // lost it again before copying: retry
		}
		done += n
	}
	return done, nil
}
