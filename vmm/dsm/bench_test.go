package dsm

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
	"github.com/hpcvm/hpcvm/vmm/microguest"
	"golang.org/x/sys/unix"
)

// Benchmarks (docs/benchmarks.md, "Distributed memory"):
//
//	go test -run '^$' -bench . -benchtime 2000x ./vmm/dsm/
//
// Faults are triggered from inside system calls (write(2) from, or
// read(2) into, the guest page through a pipe), so the kernel takes the
// userfaultfd fault exactly as it does for KVM, while the goroutine is in
// a syscall (a Go goroutine must not fault on registered memory in user
// mode: see docs/dsm.md).

const benchMem = 64 << 20

// nodePair is two (or, from newNodes, more) nodes connected over loopback.
type nodePair struct {
	nodes []*Node
	rams  []*memory.RAM
	trs   []*Transport
}

// benchSpin is the busy-poll budget of the benchmark's nodes and
// transports (HPCVM_DSM_SPIN, a Go duration; default none).
func benchSpin() time.Duration {
	d, _ := time.ParseDuration(os.Getenv("HPCVM_DSM_SPIN"))
	return d
}

// newNodePair connects two nodes over loopback; onFail (nil: the test
// fails) is told of a node failing.
func newNodePair(b testing.TB, onFail func(i int, err error)) *nodePair {
	b.Helper()
	return newNodes(b, 2, onFail)
}

// newNodes connects n nodes over loopback, as newNodePair.
func newNodes(b testing.TB, n int, onFail func(i int, err error)) *nodePair {
	b.Helper()
	return newNodesWith(b, n, onFail, nil)
}

// newNodesWith is newNodes with mod (if not nil) adjusting each node's
// configuration before the node starts.
func newNodesWith(b testing.TB, n int, onFail func(i int, err error), mod func(i int, c *NodeConfig)) *nodePair {
	b.Helper()
	requireUFFD(b)
	lns, addrs := loopbackListeners(b, n)
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	p := &nodePair{nodes: make([]*Node, n), rams: make([]*memory.RAM, n), trs: make([]*Transport, n)}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		ram, err := memory.NewRAM(benchMem, layout.MMIOGapStart)
		if err != nil {
			b.Fatal(err)
		}
		p.rams[i] = ram
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p.trs[i], errs[i] = NewTransport(context.Background(), TransportConfig{ID: i, Addrs: addrs, Listener: lns[i],
				VMID: "bench", Secret: testSecret, Logger: lg, BusyPoll: benchSpin()})
		}(i)
	}
	wg.Wait()
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			b.Fatal(errs[i])
		}
		cfg := NodeConfig{RAM: p.rams[i], Transport: p.trs[i], Logger: lg, BusyPoll: benchSpin(),
			OnFail: func(err error) {
				if onFail != nil {
					onFail(i, err)
				} else {
					b.Errorf("node %d failed: %v", i, err)
				}
			}}
		if mod != nil {
			mod(i, &cfg)
		}
		n, err := NewNode(cfg)
		if err != nil {
			b.Fatal(err)
		}
		p.nodes[i] = n
	}
	b.Cleanup(func() {
		for i := 0; i < n; i++ {
			p.trs[i].SetClosing()
		}
		for i := 0; i < n; i++ {
			p.nodes[i].Close()
			p.trs[i].Close()
			p.rams[i].Close()
		}
	})
	return p
}

// kernelReader/kernelWriter touch a guest page from inside a syscall.
type pipe struct{ r, w int }

func newPipe(b testing.TB) pipe {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	return pipe{fds[0], fds[1]}
}

var sink [8]byte

// kernelRead makes the kernel read one byte of host page p (write(2)).
func (pp pipe) kernelRead(b testing.TB, p []byte) {
	if _, err := unix.Write(pp.w, p[:1]); err != nil {
		b.Fatal(err)
	}
	if _, err := unix.Read(pp.r, sink[:1]); err != nil {
		b.Fatal(err)
	}
}

// kernelWrite makes the kernel write one byte into host page p (read(2)).
func (pp pipe) kernelWrite(b testing.TB, p []byte, v byte) {
	sink[0] = v
	if _, err := unix.Write(pp.w, sink[:1]); err != nil {
		b.Fatal(err)
	}
	if _, err := unix.Read(pp.r, p[:1]); err != nil {
		b.Fatal(err)
	}
}

func report(b *testing.B, name string, d []time.Duration) {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	if len(d) == 0 {
		return
	}
	b.ReportMetric(float64(d[len(d)/2].Nanoseconds())/1e3, name+"-median-us")
	b.ReportMetric(float64(d[len(d)*99/100].Nanoseconds())/1e3, name+"-p99-us")
}

// fillPattern gives pages [first, first+n) non-zero content, owned by
// slice 0, so faults move real 4 KiB pages.
func (p *nodePair) fillPattern(b *testing.B, first, n int) {
	buf := make([]byte, PageSize)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for i := 0; i < n; i++ {
		if _, err := p.nodes[0].WriteAt(buf, int64((first+i)*PageSize)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRemoteReadFault: slice 1 reads a page slice 0 owns (home on
// slice 0): missing fault -> read request -> home fetches locally ->
// grant with 4 KiB -> UFFDIO_COPY. Reset (not timed): slice 0 writes it.
func BenchmarkRemoteReadFault(b *testing.B) {
	p := newNodePair(b, nil)
	pp := newPipe(b)
	const pg = 0x200 // even: homed on slice 0
	p.fillPattern(b, pg, 1)
	host := p.nodes[1].hostPage(pg)
	buf := make([]byte, 8)
	d := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		pp.kernelRead(b, host)
		d = append(d, time.Since(t0))

		b.StopTimer()
		p.nodes[0].WriteAt(buf[:1], pg*PageSize+8) // invalidates slice 1's copy
		b.StartTimer()
	}
	report(b, "fault", d)
}

// BenchmarkWriteUpgrade: slice 1 holds a shared copy and writes: WP fault
// -> write request -> home invalidates slice 0's copy -> grant without
// data -> write protection lifted. Reset (not timed): slice 0 reads it.
func BenchmarkWriteUpgrade(b *testing.B) {
	p := newNodePair(b, nil)
	pp := newPipe(b)
	const pg = 0x202
	p.fillPattern(b, pg, 1)
	host := p.nodes[1].hostPage(pg)
	buf := make([]byte, 8)
	pp.kernelRead(b, host) // shared copy on slice 1
	d := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		pp.kernelWrite(b, host, byte(i))
		d = append(d, time.Since(t0))
		b.StopTimer()
		p.nodes[0].ReadAt(buf[:1], pg*PageSize) // both shared again
		if p.nodes[1].pages[pg].st != shared {
			b.Fatalf("slice 1 page state %v after slice 0's read, want shared", p.nodes[1].pages[pg].st)
		}
		b.StartTimer()
	}
	report(b, "upgrade", d)
}

// tcpEcho is the baseline: a loopback TCP connection whose far end
// answers every frame with a frame of the same size, using the DSM's
// framing. With raw, both ends are like the DSM's connections (blocking
// sockets, dedicated threads: see sock); otherwise they use Go's net
// package and its poller, as an ordinary Go program would.
type tcpEcho struct {
	c     net.Conn
	s     *sock
	fr    *FrameReader
	frame []byte
}

func newTCPEcho(b *testing.B, raw bool) *tcpEcho {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.(*net.TCPConn).SetNoDelay(true)
		var r io.Reader = c
		write := func(p []byte) error { _, err := c.Write(p); return err }
		if raw {
			runtime.LockOSThread()
			s, err := detach(c, time.Minute, 0)
			if err != nil {
				return
			}
			defer s.close()
			r, write = s, s.writeAll
		}
		fr := NewFrameReader(r)
		var out []byte
		for {
			m, err := fr.Read()
			if err != nil {
				return
			}
			m.Type = MsgGrant
			out, _ = AppendFrame(out[:0], &m)
			if write(out) != nil {
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	c.(*net.TCPConn).SetNoDelay(true)
	req := Msg{Type: MsgFetchReply, Page: 1, Flags: FlagData, Data: make([]byte, PageSize)}
	frame, _ := AppendFrame(nil, &req)
	e := &tcpEcho{c: c, frame: frame, fr: NewFrameReader(c)}
	if raw {
		if e.s, err = detach(c, time.Minute, 0); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(e.s.close)
		e.fr = NewFrameReader(e.s)
	}
	return e
}

// roundTrip sends 4 KiB and waits for 4 KiB back.
func (e *tcpEcho) roundTrip(b *testing.B) time.Duration {
	t0 := time.Now()
	var err error
	if e.s != nil {
		err = e.s.writeAll(e.frame)
	} else {
		_, err = e.c.Write(e.frame)
	}
	if err != nil {
		b.Fatal(err)
	}
	if _, err := e.fr.Read(); err != nil {
		b.Fatal(err)
	}
	return time.Since(t0)
}

// BenchmarkTCPRoundTrip4K: a 4 KiB frame to a loopback TCP peer and a
// 4 KiB frame back.
func BenchmarkTCPRoundTrip4K(b *testing.B) {
	e := newTCPEcho(b, false)
	d := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d = append(d, e.roundTrip(b))
	}
	report(b, "rtt", d)
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// BenchmarkFaultVsTCP measures, interleaved in one run (so under the same
// load), a 4 KiB loopback TCP round trip through Go's net package
// ("rtt"), the same over blocking sockets on dedicated threads like the
// DSM's ("rawrtt"), a remote read fault and a write upgrade, and reports
// medians, 99th percentiles and the fault/RTT ratios (docs/benchmarks.md).
func BenchmarkFaultVsTCP(b *testing.B) {
	p := newNodePair(b, nil)
	pp := newPipe(b)
	e := newTCPEcho(b, false)
	er := newTCPEcho(b, true)
	const pgRead, pgUp = 0x200, 0x202 // homed on slice 0
	p.fillPattern(b, pgRead, 1)
	p.fillPattern(b, pgUp, 1)
	readHost, upHost := p.nodes[1].hostPage(pgRead), p.nodes[1].hostPage(pgUp)
	buf := make([]byte, 8)
	pp.kernelRead(b, upHost) // shared copy on slice 1
	var rtt, raw, rd, up []time.Duration
	runtime.LockOSThread() // the raw client blocks its thread, like a vCPU
	defer runtime.UnlockOSThread()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rtt = append(rtt, e.roundTrip(b))
		raw = append(raw, er.roundTrip(b))

		t0 := time.Now()
		pp.kernelRead(b, readHost)
		rd = append(rd, time.Since(t0))

		t0 = time.Now()
		pp.kernelWrite(b, upHost, byte(i))
		up = append(up, time.Since(t0))

		b.StopTimer()
		p.nodes[0].WriteAt(buf[:1], pgRead*PageSize+8) // invalidates slice 1's copy
		p.nodes[0].ReadAt(buf[:1], pgUp*PageSize)      // both shared again
		b.StartTimer()
	}
	report(b, "rtt", rtt)
	report(b, "rawrtt", raw)
	report(b, "fault", rd)
	report(b, "upgrade", up)
	b.ReportMetric(float64(median(rd))/float64(median(rtt)), "fault/rtt")
	b.ReportMetric(float64(median(up))/float64(median(rtt)), "upgrade/rtt")
	b.ReportMetric(float64(median(rd))/float64(median(raw)), "fault/rawrtt")
	b.ReportMetric(float64(median(up))/float64(median(raw)), "upgrade/rawrtt")
}

// BenchmarkFaultThroughput: 8 threads on slice 1 fault distinct pages
// owned by slice 0 (half homed on each slice); reports faults/s served.
func BenchmarkFaultThroughput(b *testing.B) {
	p := newNodePair(b, nil)
	const workers = 8
	const first = 0x400
	total := b.N
	if max := benchMem/PageSize - first; total > max {
		total = max
	}
	p.fillPattern(b, first, total)
	pipes := make([]pipe, workers)
	for i := range pipes {
		pipes[i] = newPipe(b)
	}
	b.ResetTimer()
	t0 := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for pg := first + w; pg < first+total; pg += workers {
				pipes[w].kernelRead(b, p.nodes[1].hostPage(pg))
			}
		}(w)
	}
	wg.Wait()
	b.ReportMetric(float64(total)/time.Since(t0).Seconds(), "faults/s")
}

// runPlain runs the "private" program on an ordinary single-node machine
// (no DSM, no userfaultfd) with ncpu vCPUs and returns the elapsed time.
func runPlain(b *testing.B, ncpu, iters int) time.Duration {
	start := time.Now()
	park := &parkOnDone{}
	m, err := machine.New(machine.Config{CPUs: ncpu, MemBytes: testMem, Loader: microguest.Program{Code: mustProgram("private").Build(iters)},
		Hooks: park})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	park.m = m
	done := &countDev{n: ncpu, stop: func() { m.Stop(machine.ExitPoweroff, "done", nil) }}
	if err := m.IO.Register("done", portDone, 1, done); err != nil {
		b.Fatal(err)
	}
	if e := m.Run(context.Background()); e.Kind != machine.ExitPoweroff {
		b.Fatalf("plain machine: %v %s", e.Kind, e.Reason)
	}
	return time.Since(start)
}

// parkOnDone parks a vCPU after it wrote the done port, as slices do.
type parkOnDone struct{ m *machine.Machine }

func (parkOnDone) BeforeRun(*kvm.VCPU) error { return nil }
func (p *parkOnDone) HandleExit(c *kvm.VCPU, e *kvm.Exit) (bool, error) {
	if e.Reason == kvm.ExitIO && e.IOWrite && e.Port == portDone {
		p.m.IO.Write(uint64(e.Port), e.IOData[:e.IOSize])
		p.m.Idle(nil)
		return true, nil
	}
	return false, nil
}

type countDev struct {
	mu   sync.Mutex
	n    int
	stop func()
}

func (d *countDev) Read(uint64, []byte) {}
func (d *countDev) Write(uint64, []byte) {
	d.mu.Lock()
	d.n--
	last := d.n == 0
	d.mu.Unlock()
	if last {
		d.stop() // on the vCPU thread, so it is done before Run returns
	}
}

// cpuTime is the CPU time (user + system, all threads) this process used.
func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkSpeedupPrivate: a low-sharing CPL3 kernel (sum of squares in
// registers, result to a private page) split over 2 slices x 1 vCPU vs 1
// slice x 1 vCPU, same total work ("speedup"). The same run also
// measures what this host gives two vCPUs without any DSM, as the
// ceiling: one ordinary VM with 2 vCPUs vs one with 1 ("smp-speedup"),
// and two independent 1-vCPU VMs at once vs one ("2vm-speedup"). On a
// busy host the wall-clock figures say more about the host than about
// the DSM, so the CPU time of both DSM runs is reported too:
// "cpu-efficiency" = CPU(1 slice) / CPU(2 slices); 1.0 means splitting
// cost no extra work, and with two idle cores the speedup would then
// approach 2.
func BenchmarkSpeedupPrivate(b *testing.B) {
	const work = 1 << 21 // x1024 iterations in total
	var t1, t2, p1, p2, v2, c1, c2 time.Duration
	for i := 0; i < b.N; i++ {
		c0 := cpuTime()
		r1 := runInProcess(b, 1, 1, "private", work)
		cm := cpuTime()
		r2 := runInProcess(b, 2, 2, "private", work/2)
		c1, c2 = c1+cm-c0, c2+cpuTime()-cm
		if len(r1.reports) != 1 || r1.reports[0] != privateSum(work) || len(r2.reports) != 2 || r2.reports[0] != privateSum(work/2) {
			b.Fatalf("wrong sums: %v %v", r1.reports, r2.reports)
		}
		t1 += r1.elapsed
		t2 += r2.elapsed
		p1 += runPlain(b, 1, work)
		p2 += runPlain(b, 2, work/2)
		var wg sync.WaitGroup
		var e [2]time.Duration
		start := time.Now()
		for j := range e {
			wg.Add(1)
			go func() { defer wg.Done(); e[j] = runPlain(b, 1, work/2) }()
		}
		wg.Wait()
		v2 += time.Since(start)
	}
	n := float64(b.N)
	b.ReportMetric(t1.Seconds()/n, "1slice-s")
	b.ReportMetric(t2.Seconds()/n, "2slices-s")
	b.ReportMetric(t1.Seconds()/t2.Seconds(), "speedup")
	b.ReportMetric(p1.Seconds()/p2.Seconds(), "smp-speedup")
	b.ReportMetric(p1.Seconds()/v2.Seconds(), "2vm-speedup")
	b.ReportMetric(c1.Seconds()/n, "1slice-cpu-s")
	b.ReportMetric(c2.Seconds()/n, "2slices-cpu-s")
	b.ReportMetric(c1.Seconds()/c2.Seconds(), "cpu-efficiency")
}

// BenchmarkContendedPage: every vCPU does lock inc on one qword; 2 slices,
// vCPUs dealt round-robin; reports total increments per second.
func BenchmarkContendedPage(b *testing.B) {
	for _, ncpu := range []int{1, 2, 3, 4} {
		b.Run(map[int]string{1: "vcpus=1", 2: "vcpus=2", 3: "vcpus=3", 4: "vcpus=4"}[ncpu], func(b *testing.B) {
			const iters = 2_000_000
			var el time.Duration
			for i := 0; i < b.N; i++ {
				r := runInProcess(b, 2, ncpu, "lockinc", iters)
				if r.finals[0] != uint64(ncpu*iters) {
					b.Fatalf("sum %d, want %d", r.finals[0], ncpu*iters)
				}
				el += r.elapsed
			}
			b.ReportMetric(float64(ncpu*iters*b.N)/el.Seconds(), "incs/s")
		})
	}
}
