package dsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hpcvm/hpcvm/vmm/irqchip"
	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// SliceConfig describes one slice of a distributed VM.
type SliceConfig struct {
	Transport TransportConfig
	// Placement lists the vCPU ids each slice runs, indexed by slice id;
	// together they must be 0..n-1, each exactly once (CheckPlacement). A
	// slice may run none. Every slice gets the same placement.
	Placement [][]int
	MemBytes  uint64
	// Loader writes the boot image (on slice 0 only, before guest memory
	// is registered) and sets up the vCPUs (on every slice).
	Loader machine.Loader
	// DonePort: each vCPU writes it once when finished (its thread is
	// then parked). When every vCPU has, slice 0 calls Finish and stops
	// the VM on all slices. 0: none (an OS guest stops through its
	// devices, Home.Stop).
	DonePort uint16
	// Setup runs on slice 0 only and attaches the VM's devices: they all
	// live on slice 0 (the home), and the other slices forward their
	// vCPUs' port I/O and MMIO accesses to it.
	Setup func(h *Home) error
	// Finish runs on slice 0 once all vCPUs are done, before shutdown,
	// with coherent access to guest memory (e.g. to read results).
	Finish func(g memory.Guest) error
	// Hold is the coherence hold window (NodeConfig.Hold).
	Hold time.Duration
	// VCPUNice lowers the vCPU threads' priority (machine.Config.VCPUNice)
	// so that this slice serves the others' requests before it runs its
	// own vCPUs further.
	VCPUNice int
	// TimerSlack coalesces the local vCPUs' TSC-deadline timer expiries on
	// a grid of this period (irqchip.LAPICConfig.TimerSlack; 0: exact).
	TimerSlack time.Duration
	// ReplicateTables replicates the guest's page-table pages instead of
	// moving them (replica.go): the tables reachable from the local
	// vCPUs' initial CR3.
	ReplicateTables bool
	// ReplicateKernelTables replicates a Linux guest's static page tables
	// (kernelTablePages), found from a vCPU's CR3 once the guest starts
	// its application processors.
	ReplicateKernelTables bool
	// ProfileEvery, if set, samples the local vCPUs' guest RIP at this
	// period (profile.go); the result is SliceResult.Profile.
	ProfileEvery time.Duration
	// StatsEvery, if set with OnStats, passes the slice's counters to
	// OnStats at this period while the VM runs: page traffic over time
	// (boot, a job's phases), where SliceResult.Stats has only the sum.
	StatsEvery time.Duration
	OnStats    func(StatsSnapshot)
	Logger     *slog.Logger
}

// Home is what slice 0's Setup gets to attach the VM's devices.
type Home struct {
	// Machine's buses (IO, MMIO) receive the accesses of every vCPU of
	// every slice.
	Machine *machine.Machine
	// Memory is coherent guest memory: devices must use it (never the
	// RAM directly).
	Memory memory.Guest
	// IOAPIC is the VM's IOAPIC (at layout.IOAPICAddr): devices take
	// their interrupt lines from it (IOAPIC.Line).
	IOAPIC *irqchip.IOAPIC
	// MSI sends a message-signalled interrupt to whichever slice runs
	// its target vCPU.
	MSI func(addr uint64, data uint32)
	// Stop ends the VM on every slice in order (a guest's poweroff or
	// reset register); slice 0's RunSlice then returns kind and reason,
	// the other slices ExitPoweroff with the reason. It does not block.
	Stop func(kind machine.ExitKind, reason string)
}

// SliceResult is the outcome of RunSlice.
type SliceResult struct {
	Exit  machine.Exit
	Stats StatsSnapshot
	// HotPages are the pages this slice requested most (at most 10).
	HotPages []HotPage
	// Profile is the RIP sampling result (SliceConfig.ProfileEvery), the
	// 30 most sampled addresses.
	Profile *RIPProfile
}

// StatsSnapshot is a copy of Stats.
type StatsSnapshot struct {
	ReadFaults, WriteFaults, Requests, HomeServed, Invalidations, Fetches int64
	IOForwarded, IOServed, IRQsSent, IRQsReceived                         int64
	Held                                                                  int64
	Replicated, UpdatesSent, UpdatesApplied                               int64
	ZeroFilled, Unlinked, Cooled                                          int64
	// BytesSent and BytesReceived: the slice's traffic with its peers
	// (Transport.BytesSent, BytesReceived).
	BytesSent, BytesReceived int64
}

// Snapshot copies the counters (the byte counts are the transport's:
// RunSlice's results fill them in).
func (s *Stats) Snapshot() StatsSnapshot {
	return StatsSnapshot{ReadFaults: s.ReadFaults.Load(), WriteFaults: s.WriteFaults.Load(), Requests: s.Requests.Load(),
		HomeServed: s.HomeServed.Load(), Invalidations: s.Invalidations.Load(), Fetches: s.Fetches.Load(),
		IOForwarded: s.IOForwarded.Load(), IOServed: s.IOServed.Load(), IRQsSent: s.IRQsSent.Load(),
		IRQsReceived: s.IRQsReceived.Load(), Held: s.Held.Load(), Replicated: s.Replicated.Load(),
		UpdatesSent: s.UpdatesSent.Load(), UpdatesApplied: s.UpdatesApplied.Load(), ZeroFilled: s.ZeroFilled.Load(), Unlinked: s.Unlinked.Load(),
		Cooled: s.Cooled.Load()}
}

// stats is the node's counters with the transport's byte counts.
func (s *sliceRun) stats() StatsSnapshot {
	st := s.node.Stats.Snapshot()
	st.BytesSent, st.BytesReceived = s.tr.BytesSent.Load(), s.tr.BytesReceived.Load()
	return st
}

// reportStats passes the counters to OnStats every StatsEvery until done.
func (s *sliceRun) reportStats(done <-chan struct{}) {
	tick := time.NewTicker(s.cfg.StatsEvery)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			s.cfg.OnStats(s.stats())
		}
	}
}

// machine returns the slice's machine once it exists (else nil).
func (s *sliceRun) machine() *machine.Machine { return s.mp.Load() }

// sliceRun is the coordination state of one slice.
type sliceRun struct {
	cfg   SliceConfig
	id    int
	n     int
	ncpu  int   // vCPUs of the whole VM
	vcpus []int // vCPUs this slice runs
	log   *slog.Logger
	tr    *Transport
	node  *Node
	irq   *irqState
	mp    atomic.Pointer[machine.Machine]
	epoch int64      // slice 0: the guest TSC epoch (its monotonic clock)
	clock guestClock // set before the machine runs

	// mmu is held (read) while another goroutine kicks or stops the
	// machine; retireMachine takes it before the machine is closed.
	mmu     sync.RWMutex
	mclosed bool

	bootCR3 []uint64 // local vCPUs' initial CR3 with paging on (startLoader)
	// smpSeen: a startup IPI was sent or received here (the guest's
	// application processors are coming up).
	smpSeen atomic.Bool
	// The guest kernel's page tables replicated so far, and when to look
	// for new ones (monotonic ns) (ReplicateKernelTables).
	ktMu   sync.Mutex
	ktSet  TableSet
	ktNext atomic.Int64
	// sampler records guest RIPs (nil: ProfileEvery is 0).
	sampler *ripSampler

	mu    sync.Mutex
	m     *machine.Machine
	ready chan struct{} // closed once m is set (or the slice gives up)
	stop  *machine.Exit // requested before the machine existed
	acks  int           // slice 0: shutdown acks
	final *machine.Exit // slice 0: how the VM ends once every slice acked
}

func (s *sliceRun) stopVM(kind machine.ExitKind, reason string, err error) {
	s.mu.Lock()
	m := s.m
	if m == nil && s.stop == nil {
		s.stop = &machine.Exit{Kind: kind, Reason: reason, Err: err}
	}
	s.mu.Unlock()
	if m != nil {
		s.mmu.RLock()
		if !s.mclosed {
			m.Stop(kind, reason, err)
		}
		s.mmu.RUnlock()
	}
}

// StopFaultGrace is how long a stopping slice lets its vCPUs leave the
// guest before it releases the page faults they are blocked in.
const StopFaultGrace = 2 * time.Second

// releaseStuckFaults: a vCPU blocked in a page fault whose page will never
// come (the other slices are stopping too, or the fault wait cannot be
// interrupted by the kick's signal) would keep the machine from stopping.
// Once the machine stops (or ctx ends) and the vCPUs have not all left
// within StopFaultGrace, the node closes its userfaultfd, which releases
// every blocked fault as a node failure does; the VM is stopping anyway.
func (s *sliceRun) releaseStuckFaults(ctx context.Context, m *machine.Machine, runDone <-chan struct{}) {
	select {
	case <-runDone:
		return
	case <-m.Stopping():
	case <-ctx.Done():
	}
	t := time.NewTimer(StopFaultGrace)
	defer t.Stop()
	select {
	case <-runDone:
	case <-t.C:
		s.log.Warn("dsm: vCPUs still running after the stop; releasing their page faults", "grace", StopFaultGrace)
		s.node.releaseFaults()
	}
}

// kick forces vCPU id out of the guest (from any goroutine), unless the
// machine does not exist yet or is being closed.
func (s *sliceRun) kick(id int) {
	s.mmu.RLock()
	if m := s.mp.Load(); m != nil && !s.mclosed {
		m.Kick(id)
	}
	s.mmu.RUnlock()
}

// retireMachine waits for kicks and stops in progress on other goroutines
// (network readers, timers) and makes later ones no-ops, so the machine
// can be closed (its vCPUs' run pages unmapped).
func (s *sliceRun) retireMachine() {
	s.mmu.Lock()
	s.mclosed = true
	s.mmu.Unlock()
}

// RunSlice runs one slice until the VM stops everywhere (every vCPU done,
// or a failure). A lost peer stops the VM with an error naming it.
func RunSlice(ctx context.Context, cfg SliceConfig) (SliceResult, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &sliceRun{cfg: cfg, id: cfg.Transport.ID, n: len(cfg.Transport.Addrs), ready: make(chan struct{}),
		epoch: monotonicNow()}
	readyOnce := sync.OnceFunc(func() { close(s.ready) })
	defer readyOnce()
	s.log = cfg.Logger.With("slice", s.id)
	ncpu, err := CheckPlacement(cfg.Placement, s.n)
	if err != nil {
		return SliceResult{}, err
	}
	if s.id < 0 || s.id >= s.n {
		return SliceResult{}, fmt.Errorf("dsm: slice id %d not in 0..%d", s.id, s.n-1)
	}
	s.ncpu, s.vcpus = ncpu, cfg.Placement[s.id]
	if cfg.ProfileEvery > 0 {
		s.sampler = &ripSampler{s: s, every: cfg.ProfileEvery, counts: map[uint64]int64{}}
	}
	// Before the transport: interrupt messages may arrive as soon as it runs.
	s.irq = newIRQState(s)
	defer s.irq.close()
	ram, err := memory.NewRAM(cfg.MemBytes, layout.MMIOGapStart)
	if err != nil {
		return SliceResult{}, err
	}
	defer ram.Close()
	if s.id == 0 {
		// Loaded before userfaultfd registration: slice 0 starts as the
		// owner of every page.
		if err := cfg.Loader.Load(ram, s.ncpu); err != nil {
			return SliceResult{}, fmt.Errorf("dsm: slice 0 loading the guest: %w", err)
		}
	}
	if s.tr, err = NewTransport(ctx, cfg.Transport); err != nil {
		return SliceResult{}, err
	}
	defer s.tr.Close()
	// s.node is set before the node starts: the control handlers use it.
	s.node, err = newNode(NodeConfig{RAM: ram, Transport: s.tr, Logger: cfg.Logger, Control: s.control, Hold: cfg.Hold,
		OnFail: func(err error) { s.stopVM(machine.ExitError, err.Error(), err) }})
	if err != nil {
		return SliceResult{}, err
	}
	if err := s.node.start(); err != nil {
		return SliceResult{}, err
	}
	defer s.node.Close()
	if err := s.syncClock(); err != nil {
		return SliceResult{}, err
	}
	run := append([]int{}, s.vcpus...) // non-nil: machine treats nil as "all vCPUs"
	// No in-kernel irqchip: the slices emulate the interrupt controllers.
	m, err := machine.New(machine.Config{CPUs: s.ncpu, MemBytes: cfg.MemBytes, Loader: startLoader{cfg.Loader, s.irq},
		RAM: ram, RunVCPUs: run, Logger: cfg.Logger, Hooks: &sliceHooks{s: s}, VCPUNice: cfg.VCPUNice})
	if err != nil {
		return SliceResult{}, err
	}
	defer m.Close()
	defer s.retireMachine() // before m.Close
	if cfg.ReplicateTables {
		if err := s.classifyTables(); err != nil {
			return SliceResult{}, err
		}
	}
	if err := m.VM().TrapMSRs(msrTSCDeadline); err != nil {
		s.log.Warn("dsm: no TSC-deadline timer (IA32_TSC_DEADLINE cannot be trapped)", "err", err)
	}
	if s.id == 0 {
		if cfg.DonePort != 0 {
			if err := m.IO.Register("dsm-done", uint64(cfg.DonePort), 1, &doneDev{s: s}); err != nil {
				return SliceResult{}, err
			}
		}
		if err := m.MMIO.Register("ioapic", layout.IOAPICAddr, irqchip.IOAPICSize, s.irq.ioapic); err != nil {
			return SliceResult{}, err
		}
		if cfg.Setup != nil {
			h := &Home{Machine: m, Memory: s.node, IOAPIC: s.irq.ioapic,
				MSI:  func(addr uint64, data uint32) { s.irq.deliver(irqchip.MSIMessage(addr, data)) },
				Stop: func(kind machine.ExitKind, reason string) { go s.stopAll(kind, reason, nil) }}
			if err := cfg.Setup(h); err != nil {
				return SliceResult{}, err
			}
		}
	}
	s.mu.Lock()
	s.m = m
	s.mp.Store(m)
	pre := s.stop
	s.mu.Unlock()
	readyOnce()
	if pre != nil {
		m.Stop(pre.Kind, pre.Reason, pre.Err)
	}
	runDone := make(chan struct{})
	go s.releaseStuckFaults(ctx, m, runDone)
	if s.sampler != nil {
		go s.sampler.run(runDone)
	}
	if cfg.StatsEvery > 0 && cfg.OnStats != nil {
		go s.reportStats(runDone)
	}
	exit := m.Run(ctx)
	close(runDone)
	if exit.Kind != machine.ExitError && exit.Kind != machine.ExitStopped {
		if s.id != 0 {
			// Slice 0 closes last: wait for it so our close does not look
			// like a failure to the others.
			s.tr.WaitPeerClosed(0, 5*time.Second)
		}
	} else {
		// Stopped locally (ctx) or failed: make sure the others stop too.
		s.tr.Close()
	}
	res := SliceResult{Exit: exit, Stats: s.stats(), HotPages: s.node.HotPages(10)}
	if s.sampler != nil {
		res.Profile = s.sampler.profile(30)
	}
	if err := s.node.Err(); err != nil {
		return res, err
	}
	if exit.Kind == machine.ExitError {
		return res, fmt.Errorf("slice %d: %s: %w", s.id, exit.Reason, exit.Err)
	}
	return res, nil
}

// doneDev (on slice 0) counts the vCPUs of all slices reaching the done
// port: the other slices forward their writes like any port I/O.
type doneDev struct {
	s     *sliceRun
	mu    sync.Mutex
	count int
}

func (d *doneDev) Read(uint64, []byte) {}
func (d *doneDev) Write(uint64, []byte) {
	d.mu.Lock()
	d.count++
	last := d.count == d.s.ncpu
	d.mu.Unlock()
	if last {
		d.s.log.Debug("dsm: every vCPU is done")
		go d.s.finish()
	}
}

// control handles the non-page messages (on a reader goroutine).
func (s *sliceRun) control(from int, m *Msg) {
	switch m.Type {
	case MsgIOReq:
		if s.id != 0 {
			s.node.fail(fmt.Errorf("%w: slice %d forwarded I/O to slice %d, not the home", ErrProtocol, from, s.id))
			return
		}
		r := *m
		r.Data = append([]byte(nil), m.Data...)
		// Devices may need guest pages from the very slice whose reader
		// this is: never run them on the reader goroutine.
		go s.serveIO(from, &r)
	case MsgClockReq:
		if s.id != 0 {
			s.node.fail(fmt.Errorf("%w: slice %d asked slice %d for the clock", ErrProtocol, from, s.id))
			return
		}
		s.answerClock(from, m)
	case MsgInterrupt, MsgEOI, MsgAPICState:
		if err := s.irq.receive(from, m); err != nil {
			s.node.fail(err)
		}
	case MsgShutdown:
		s.tr.SetClosing()
		s.node.send(0, &Msg{Type: MsgShutdownAck})
		if m.Code != 0 {
			err := errors.New(m.Text)
			s.stopVM(machine.ExitError, "slice 0: "+m.Text, err)
		} else {
			s.stopVM(machine.ExitPoweroff, m.Text, nil)
		}
	case MsgShutdownAck:
		s.mu.Lock()
		s.acks++
		all := s.acks == s.n-1
		final := s.final
		s.mu.Unlock()
		if all {
			if final != nil {
				s.stopVM(final.Kind, final.Reason, nil)
			} else {
				s.stopVM(machine.ExitPoweroff, "all slices done", nil)
			}
		}
	default:
		s.node.fail(fmt.Errorf("%w: unexpected %v from slice %d", ErrProtocol, m.Type, from))
	}
}

// finish runs on slice 0 when every vCPU is done: read results, then stop
// every slice.
func (s *sliceRun) finish() {
	if s.cfg.Finish != nil {
		if err := s.cfg.Finish(s.node); err != nil {
			s.stopAll(machine.ExitError, "finish: "+err.Error(), err)
			return
		}
	}
	s.stopAll(machine.ExitPoweroff, "all slices done", nil)
}

// stopAll (slice 0) ends the VM on every slice, in two phases so that no
// slice mistakes it for a failure: shutdown to the others, and once all
// acknowledged, slice 0 stops with kind and reason. A failure (err) stops
// slice 0 at once and the others with the error.
func (s *sliceRun) stopAll(kind machine.ExitKind, reason string, err error) {
	s.mu.Lock()
	if s.final != nil {
		s.mu.Unlock()
		return // already stopping
	}
	s.final = &machine.Exit{Kind: kind, Reason: reason, Err: err}
	s.mu.Unlock()
	if s.n == 1 {
		s.stopVM(kind, reason, err)
		return
	}
	msg := Msg{Type: MsgShutdown, Text: reason}
	if err != nil {
		msg.Code, msg.Text = 1, err.Error()
	}
	s.tr.SetClosing()
	for j := 1; j < s.n; j++ {
		s.node.send(j, &msg)
	}
	if err != nil {
		s.stopVM(kind, reason, err)
	}
}

// kvmAvailable reports whether /dev/kvm can be opened (for callers that
// want to skip rather than fail).
func kvmAvailable() error {
	s, err := kvm.Open()
	if err != nil {
		return err
	}
	return s.Close()
}

// SliceGOMAXPROCS is the GOMAXPROCS a slice process should run with:
// vCPU threads in KVM_RUN, the connection readers (one thread per peer,
// blocked in read(2)) and the fault reader (in poll(2)) each hold a Go P
// while they wait in the kernel until the runtime takes it back (20 us to
// 10 ms later), so the protocol needs Ps beyond those (docs/dsm.md).
func SliceGOMAXPROCS(vcpus, slices int) int {
	return max(runtime.NumCPU(), vcpus+slices) + 4
}
