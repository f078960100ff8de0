package dsm

import (
	"context"
	"log/slog"
	"net"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
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

type nodePair struct {
	nodes [2]*Node
	rams  [2]*memory.RAM
	trs   [2]*Transport
}

func newNodePair(b *testing.B) *nodePair {
	b.Helper()
	requireKVMAndUFFD(b)
	lns, addrs := loopbackListeners(b, 2)
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	p := &nodePair{}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := 0; i < 2; i++ {
		ram, err := memory.NewRAM(benchMem, layout.MMIOGapStart)
		if err != nil {
			b.Fatal(err)
		}
		p.rams[i] = ram
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p.trs[i], errs[i] = NewTransport(context.Background(), TransportConfig{ID: i, Addrs: addrs, Listener: lns[i],
				VMID: "bench", Secret: testSecret, Logger: lg})
		}(i)
	}
	wg.Wait()
	for i := 0; i < 2; i++ {
		if errs[i] != nil {
			b.Fatal(errs[i])
		}
		n, err := NewNode(NodeConfig{RAM: p.rams[i], Transport: p.trs[i], Logger: lg,
			OnFail: func(err error) { b.Errorf("node failed: %v", err) }})
		if err != nil {
			b.Fatal(err)
		}
		p.nodes[i] = n
	}
	b.Cleanup(func() {
		for i := 0; i < 2; i++ {
			p.trs[i].SetClosing()
		}
		for i := 0; i < 2; i++ {
			p.nodes[i].Close()
			p.trs[i].Close()
			p.rams[i].Close()
		}
	})
	return p
}

// kernelReader/kernelWriter touch a guest page from inside a syscall.
type pipe struct{ r, w int }

func newPipe(b *testing.B) pipe {
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
	p := newNodePair(b)
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
	p := newNodePair(b)
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

// BenchmarkTCPRoundTrip4K is the baseline: a 4 KiB frame to a loopback
// TCP peer and a 4 KiB frame back, with the DSM's framing, on goroutines
// like the DSM's readers.
func BenchmarkTCPRoundTrip4K(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		fr := NewFrameReader(c)
		var out []byte
		for {
			m, err := fr.Read()
			if err != nil {
				return
			}
			m.Type = MsgGrant
			out, _ = AppendFrame(out[:0], &m)
			if _, err := c.Write(out); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	fr := NewFrameReader(c)
	req := Msg{Type: MsgFetchReply, Page: 1, Flags: FlagData, Data: make([]byte, PageSize)}
	frame, _ := AppendFrame(nil, &req)
	d := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := c.Write(frame); err != nil {
			b.Fatal(err)
		}
		if _, err := fr.Read(); err != nil {
			b.Fatal(err)
		}
		d = append(d, time.Since(t0))
	}
	report(b, "rtt", d)
}

// BenchmarkFaultThroughput: 8 threads on slice 1 fault distinct pages
// owned by slice 0 (half homed on each slice); reports faults/s served.
func BenchmarkFaultThroughput(b *testing.B) {
	p := newNodePair(b)
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

// BenchmarkSpeedupPrivate: a low-sharing CPL3 kernel (sum of squares in
// registers, result to a private page) split over 2 slices x 1 vCPU vs 1
// slice x 1 vCPU, same total work.
func BenchmarkSpeedupPrivate(b *testing.B) {
	const work = 1 << 21 // x1024 iterations in total
	var t1, t2 time.Duration
	for i := 0; i < b.N; i++ {
		r1 := runInProcess(b, 1, 1, "private", work)
		r2 := runInProcess(b, 2, 2, "private", work/2)
		if len(r1.reports) != 1 || r1.reports[0] != privateSum(work) || len(r2.reports) != 2 || r2.reports[0] != privateSum(work/2) {
			b.Fatalf("wrong sums: %v %v", r1.reports, r2.reports)
		}
		t1 += r1.elapsed
		t2 += r2.elapsed
	}
	b.ReportMetric(t1.Seconds()/float64(b.N), "1slice-s")
	b.ReportMetric(t2.Seconds()/float64(b.N), "2slices-s")
	b.ReportMetric(t1.Seconds()/t2.Seconds(), "speedup")
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
