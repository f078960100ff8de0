package dsm

import (
	"encoding/binary"
	"sync"
	"testing"

	mg "github.com/hpcvm/hpcvm/vmm/microguest"
)

// Ports and MMIO window of the forwarding test's devices (on slice 0).
const (
	fwdPortBase = 0x40       // + 4*vCPU: a register that answers last write + 1
	fwdStrOut   = 0x80       // + vCPU: string writes are summed
	fwdStrIn    = 0xA0       // + vCPU: string reads return 1, 2, 3, ...
	fwdMMIO     = 0xD0000000 // + 8*vCPU: a qword register that answers ^write
)

// echoPorts answers a read with the last value written to that port + 1.
type echoPorts struct {
	mu   sync.Mutex
	last map[uint64]uint32
}

func (d *echoPorts) Read(off uint64, b []byte) {
	d.mu.Lock()
	binary.LittleEndian.PutUint32(b, d.last[off]+1)
	d.mu.Unlock()
}
func (d *echoPorts) Write(off uint64, b []byte) {
	d.mu.Lock()
	d.last[off] = binary.LittleEndian.Uint32(b)
	d.mu.Unlock()
}

// strPorts sums bytes written (per port) and returns a counter on reads.
type strPorts struct {
	mu    sync.Mutex
	sum   map[uint64]uint64
	count map[uint64]int
	next  map[uint64]byte
}

func (d *strPorts) Read(off uint64, b []byte) {
	d.mu.Lock()
	d.next[off]++
	b[0] = d.next[off]
	d.mu.Unlock()
}
func (d *strPorts) Write(off uint64, b []byte) {
	d.mu.Lock()
	d.sum[off] += uint64(b[0])
	d.count[off]++
	d.mu.Unlock()
}

// notMMIO answers a qword read with the bitwise complement of the last write.
type notMMIO struct {
	mu   sync.Mutex
	last map[uint64]uint64
}

func (d *notMMIO) Read(off uint64, b []byte) {
	d.mu.Lock()
	binary.LittleEndian.PutUint64(b, ^d.last[off])
	d.mu.Unlock()
}
func (d *notMMIO) Write(off uint64, b []byte) {
	d.mu.Lock()
	d.last[off] = binary.LittleEndian.Uint64(b)
	d.mu.Unlock()
}

// buildForwarding: each vCPU (RDI = id) does iters rounds of: out
// (id<<20|k) to its echo port, in from it (expects +1); a qword MMIO write
// of k*id^C and read (expects the complement). It counts mismatches, then
// does one `rep outsb` of 64 bytes 1..64 from its buffer and one
// `rep insb` of 64 bytes into it, sums those, and reports (id<<24 |
// mismatches) and the sum.
func buildForwarding(iters int) []byte {
	a := mg.NewAsm()
	a.Mov(mg.R15, mg.RDI) // id (RDI is needed by rep insb)
	a.Xor(mg.R9, mg.R9)   // mismatches
	a.Xor(mg.R8, mg.R8)   // k
	// R12 = echo port, R14 = MMIO address, RBX = buffer (per vCPU page)
	a.Mov(mg.R12, mg.R15)
	a.Shl(mg.R12, 2)
	a.AddImm(mg.R12, fwdPortBase)
	a.Mov(mg.R14, mg.R15)
	a.Shl(mg.R14, 3)
	a.MovImm(mg.RAX, fwdMMIO)
	a.Add(mg.R14, mg.RAX)
	a.Mov(mg.RBX, mg.R15)
	a.Shl(mg.RBX, 12)
	a.MovImm(mg.RAX, pageE)
	a.Add(mg.RBX, mg.RAX)

	a.Label("round")
	// out dx, eax / in eax, dx with DX = R12
	a.Mov(mg.RAX, mg.R15)
	a.Shl(mg.RAX, 20)
	a.Add(mg.RAX, mg.R8)
	a.Mov(mg.R10, mg.RAX)
	a.Mov(mg.RDX, mg.R12)
	a.Raw(0xEF) // out dx, eax
	a.Xor(mg.RAX, mg.RAX)
	a.Raw(0xED) // in eax, dx
	a.AddImm(mg.R10, 1)
	a.Cmp(mg.RAX, mg.R10)
	a.J(mg.Equal, "port_ok")
	a.Inc(mg.R9)
	a.Label("port_ok")
	// MMIO qword
	a.MovImm(mg.RAX, 0x0123456789ABCDEF)
	a.Xor(mg.RAX, mg.R8)
	a.Mov(mg.R10, mg.RAX)
	a.Store(mg.R14, mg.RAX)
	a.Load(mg.RCX, mg.R14)
	a.Xor(mg.RCX, mg.R10) // ^x ^ x = all ones
	a.MovImm(mg.RAX, ^uint64(0))
	a.Cmp(mg.RCX, mg.RAX)
	a.J(mg.Equal, "mmio_ok")
	a.Inc(mg.R9)
	a.Label("mmio_ok")
	a.Inc(mg.R8)
	a.MovImm(mg.RAX, uint64(iters))
	a.Cmp(mg.R8, mg.RAX)
	a.J(mg.Below, "round")

	// Fill the buffer with bytes 1..64 (8 qwords).
	a.Mov(mg.R10, mg.RBX)
	a.MovImm(mg.RAX, 0x0807060504030201)
	a.MovImm(mg.RCX, 0x0808080808080808)
	a.MovImm(mg.R11, 8)
	a.Label("fill")
	a.Store(mg.R10, mg.RAX)
	a.Add(mg.RAX, mg.RCX)
	a.AddImm(mg.R10, 8)
	a.AddImm(mg.R11, -1)
	a.J(mg.NotEqual, "fill")
	// rep outsb: RSI = buffer, RCX = 64, DX = port
	a.Mov(mg.RSI, mg.RBX)
	a.MovImm(mg.RCX, 64)
	a.Mov(mg.RDX, mg.R15)
	a.AddImm(mg.RDX, fwdStrOut)
	a.Raw(0xF3, 0x6E)
	// rep insb: RDI = buffer, RCX = 64, DX = port
	a.Mov(mg.RDI, mg.RBX)
	a.MovImm(mg.RCX, 64)
	a.Mov(mg.RDX, mg.R15)
	a.AddImm(mg.RDX, fwdStrIn)
	a.Raw(0xF3, 0x6C)
	// sum the 64 bytes read: qword loads, then fold bytes via shifts is
	// long; sum qwords instead (the test computes the same).
	a.Xor(mg.R13, mg.R13)
	a.Mov(mg.R10, mg.RBX)
	a.MovImm(mg.R11, 8)
	a.Label("sum")
	a.Load(mg.RAX, mg.R10)
	a.Add(mg.R13, mg.RAX)
	a.AddImm(mg.R10, 8)
	a.AddImm(mg.R11, -1)
	a.J(mg.NotEqual, "sum")

	a.Mov(mg.RAX, mg.R15)
	a.Shl(mg.RAX, 24)
	a.Add(mg.RAX, mg.R9)
	a.Out(portReport)
	a.Mov(mg.RAX, mg.R13)
	a.Out(portReport)
	return finish(a)
}

// TestIOForwarding: vCPUs on slice 1 (and, as a control, vCPU 0 on slice
// 0) do port I/O, string port I/O and MMIO to devices that exist only on
// slice 0, and read back the values those devices compute.
func TestIOForwarding(t *testing.T) {
	iters := scaled(300)
	rep := &reportDev{}
	echo := &echoPorts{last: map[uint64]uint32{}}
	str := &strPorts{sum: map[uint64]uint64{}, count: map[uint64]int{}, next: map[uint64]byte{}}
	mmio := &notMMIO{last: map[uint64]uint64{}}
	const ncpu = 3
	res := runCustom(t, customVM{
		placement: [][]int{{0}, {1, 2}},
		loader:    mg.Program{Code: buildForwarding(iters)},
		setup: func(h *Home) error {
			for _, err := range []error{
				h.Machine.IO.Register("report", portReport, 1, rep),
				h.Machine.IO.Register("echo", fwdPortBase, 4*ncpu, echo),
				h.Machine.IO.Register("str-out", fwdStrOut, ncpu, str),
				h.Machine.IO.Register("str-in", fwdStrIn, ncpu, str),
				h.Machine.MMIO.Register("not", fwdMMIO, 8*ncpu, mmio),
			} {
				if err != nil {
					return err
				}
			}
			return nil
		},
	})
	// The 64 bytes 1..64 read back, as 8 little-endian qwords, summed.
	var want uint64
	buf := make([]byte, 64)
	for i := range buf {
		buf[i] = byte(i + 1)
	}
	for i := 0; i < 64; i += 8 {
		want += binary.LittleEndian.Uint64(buf[i:])
	}
	got := map[uint32]bool{}
	sums := 0
	for _, r := range rep.reports {
		if r == uint32(want) {
			sums++
		} else {
			got[r] = true
		}
	}
	for id := 0; id < ncpu; id++ {
		if !got[uint32(id)<<24] {
			t.Errorf("vCPU %d did not report 0 mismatches: reports %#x", id, rep.reports)
		}
		if str.sum[fwdStrOut-fwdStrOut+uint64(id)] != 64*65/2 || str.count[uint64(id)] != 64 {
			t.Errorf("vCPU %d string write: %d bytes summing to %d, want 64 summing to %d", id, str.count[uint64(id)], str.sum[uint64(id)], 64*65/2)
		}
	}
	if sums != ncpu {
		t.Errorf("%d vCPUs read back the string-input bytes correctly (sum %#x), want %d: reports %#x", sums, uint32(want), ncpu, rep.reports)
	}
	// vCPUs 1 and 2 forward 4 accesses per round, the string accesses (KVM
	// may split those into several exits), 2 reports and the done write;
	// vCPU 0 forwards nothing.
	if f := res[1].Stats.IOForwarded; f < int64(2*(4*iters+5)) {
		t.Errorf("slice 1 forwarded %d accesses, want at least %d", f, 2*(4*iters+5))
	}
	if res[0].Stats.IOForwarded != 0 || res[0].Stats.IOServed != res[1].Stats.IOForwarded {
		t.Errorf("slice 0 forwarded %d and served %d; slice 1 forwarded %d", res[0].Stats.IOForwarded, res[0].Stats.IOServed, res[1].Stats.IOForwarded)
	}
	t.Logf("slice stats: %+v / %+v", res[0].Stats, res[1].Stats)
}
