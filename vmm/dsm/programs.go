package dsm

import (
	"fmt"
	"sort"
	"strings"

	mg "github.com/hpcvm/hpcvm/vmm/microguest"
)

// Built-in micro-guests: the memory-model tests, benchmarks and
// `hpcvm slice --guest NAME` run them. Every vCPU writes ReportPort to
// report a value and DonePort once when it has finished.
const (
	ReportPort = 0x10
	DonePort   = 0x11

	portReport = ReportPort
	portDone   = DonePort
)

// Data pages used by the programs. Each variable is on its own page so
// pages have different homes.
const (
	pageA = mg.DataAddr
	pageB = mg.DataAddr + 0x1000
	pageC = mg.DataAddr + 0x2000
	pageD = mg.DataAddr + 0x3000
	pageE = mg.DataAddr + 0x4000 // + vCPU id * 0x1000: per-vCPU slots
)

// Builtin is a built-in micro-guest: Build returns its code for iters
// iterations; Results are the guest-physical addresses whose final qwords
// tell the outcome (read coherently once every vCPU is done).
type Builtin struct {
	Build   func(iters int) []byte
	Results []uint64
}

var programs = map[string]Builtin{
	"lockinc":   {buildLockInc, []uint64{pageA}},
	"spinlock":  {buildSpinlock, []uint64{pageB, pageA + 8}},
	"mp":        {buildMessagePassing, nil},
	"sb-mfence": {func(n int) []byte { return buildStoreBuffering(n, true) }, nil},
	"sb":        {func(n int) []byte { return buildStoreBuffering(n, false) }, nil},
	"barrier":   {buildBarrier, []uint64{pageC}},
	"pingpong":  {buildPingPong, []uint64{pageA, pageA + 8, pageB}},
	"private":   {buildPrivate, nil},
}

func finish(a *mg.Asm) []byte {
	a.Out(portDone)
	a.Label("spin_forever")
	a.Pause()
	a.Jmp("spin_forever")
	return a.MustBytes()
}

// buildLockInc: every vCPU does iters `lock inc` on one qword.
func buildLockInc(iters int) []byte {
	a := mg.NewAsm()
	a.MovImm(mg.RBX, pageA)
	a.MovImm(mg.RCX, uint64(iters))
	a.Label("loop")
	a.LockInc(mg.RBX)
	a.AddImm(mg.RCX, -1)
	a.J(mg.NotEqual, "loop")
	return finish(a)
}

// spinAcquire takes the xchg spinlock at [lock] (zero is mg.R13).
func spinAcquire(a *mg.Asm, lock mg.Reg, tag string) {
	a.Label(tag + "_try")
	a.MovImm(mg.RAX, 1)
	a.Xchg(lock, mg.RAX)
	a.Cmp(mg.RAX, mg.R13)
	a.J(mg.Equal, tag+"_locked")
	a.Label(tag + "_wait")
	a.Pause()
	a.Load(mg.RAX, lock)
	a.Cmp(mg.RAX, mg.R13)
	a.J(mg.NotEqual, tag+"_wait")
	a.Jmp(tag + "_try")
	a.Label(tag + "_locked")
}

// buildSpinlock: an xchg spinlock at pageA protects two non-atomic
// counters, one on another page (pageB) and one next to the lock.
func buildSpinlock(iters int) []byte {
	a := mg.NewAsm()
	a.Xor(mg.R13, mg.R13)
	a.MovImm(mg.RBX, pageA)
	a.MovImm(mg.R12, pageB)
	a.MovImm(mg.R14, pageA+8)
	a.MovImm(mg.RCX, uint64(iters))
	a.Label("outer")
	spinAcquire(a, mg.RBX, "lk")
	a.Load(mg.RDX, mg.R12)
	a.Inc(mg.RDX)
	a.Store(mg.R12, mg.RDX)
	a.Load(mg.RDX, mg.R14)
	a.Inc(mg.RDX)
	a.Store(mg.R14, mg.RDX)
	a.Store(mg.RBX, mg.R13) // release: a plain store under TSO
	a.AddImm(mg.RCX, -1)
	a.J(mg.NotEqual, "outer")
	return finish(a)
}

// spinUntilEq waits until [addr] == want.
func spinUntilEq(a *mg.Asm, addr, want mg.Reg, tag string) {
	a.Label(tag)
	a.Load(mg.RAX, addr)
	a.Cmp(mg.RAX, want)
	a.J(mg.Equal, tag+"_ok")
	a.Pause()
	a.Jmp(tag)
	a.Label(tag + "_ok")
}

// buildMessagePassing: vCPU 0 writes data=k (pageA) then flag=k (pageB)
// and waits for ack=k (pageC); vCPU 1 waits for flag=k, checks data==k
// (counting stale reads), and acks. vCPU 1 reports its error count.
func buildMessagePassing(iters int) []byte {
	a := mg.NewAsm()
	a.Xor(mg.R13, mg.R13)
	a.MovImm(mg.RBX, pageA)
	a.MovImm(mg.R12, pageB)
	a.MovImm(mg.R14, pageC)
	a.MovImm(mg.R15, uint64(iters+1))
	a.MovImm(mg.R8, 1)
	a.Xor(mg.R9, mg.R9)
	a.Cmp(mg.RDI, mg.R13)
	a.J(mg.Equal, "writer")
	a.MovImm(mg.R10, 1)
	a.Cmp(mg.RDI, mg.R10)
	a.J(mg.Equal, "reader")
	a.Jmp("end")

	a.Label("writer")
	a.Store(mg.RBX, mg.R8)
	a.Store(mg.R12, mg.R8)
	spinUntilEq(a, mg.R14, mg.R8, "wack")
	a.Inc(mg.R8)
	a.Cmp(mg.R8, mg.R15)
	a.J(mg.Below, "writer")
	a.Jmp("end")

	a.Label("reader")
	spinUntilEq(a, mg.R12, mg.R8, "rflag")
	a.Load(mg.RDX, mg.RBX)
	a.Cmp(mg.RDX, mg.R8)
	a.J(mg.Equal, "rok")
	a.Inc(mg.R9)
	a.Label("rok")
	a.Store(mg.R14, mg.R8)
	a.Inc(mg.R8)
	a.Cmp(mg.R8, mg.R15)
	a.J(mg.Below, "reader")
	a.Mov(mg.RAX, mg.R9)
	a.Out(portReport)
	a.Label("end")
	return finish(a)
}

// barrier2 is a counting barrier on [pageD] for participants counted in
// mg.R11: lock xadd 1, then wait until the count reaches target (mg.R10).
func barrier(a *mg.Asm, tag string) {
	a.MovImm(mg.RDX, pageD)
	a.MovImm(mg.RAX, 1)
	a.LockXadd(mg.RDX, mg.RAX)
	a.Label(tag)
	a.Load(mg.RAX, mg.RDX)
	a.Cmp(mg.RAX, mg.R10)
	a.J(mg.AboveOrEqual, tag+"_ok")
	a.Pause()
	a.Jmp(tag)
	a.Label(tag + "_ok")
}

// buildStoreBuffering: vCPUs 0 and 1 each reset their variable (x on
// pageA, y on pageB), meet at a barrier, store 1 to theirs, optionally
// mfence, load the other's into a slot on pageC, and meet again; vCPU 0
// then counts iterations where both loads saw 0, and reports
// [count, iterations].
func buildStoreBuffering(iters int, fence bool) []byte {
	a := mg.NewAsm()
	a.Xor(mg.R13, mg.R13)
	a.MovImm(mg.R15, 2)
	a.Cmp(mg.RDI, mg.R15)
	a.J(mg.AboveOrEqual, "end") // only vCPUs 0 and 1 take part
	a.Xor(mg.R10, mg.R10)       // barrier target
	a.Xor(mg.R9, mg.R9)         // both-zero count
	a.Xor(mg.R8, mg.R8)         // iteration
	a.MovImm(mg.RBX, pageA)     // own variable
	a.MovImm(mg.R12, pageB)     // other's variable
	a.MovImm(mg.R14, pageC)     // own result slot
	a.Cmp(mg.RDI, mg.R13)
	a.J(mg.Equal, "setup_done")
	a.MovImm(mg.RBX, pageB)
	a.MovImm(mg.R12, pageA)
	a.MovImm(mg.R14, pageC+8)
	a.Label("setup_done")
	a.MovImm(mg.R11, 1)

	a.Label("iter")
	a.Store(mg.RBX, mg.R13)
	a.AddImm(mg.R10, 2)
	barrier(a, "b1")
	a.Store(mg.RBX, mg.R11)
	if fence {
		a.Mfence()
	}
	a.Load(mg.RCX, mg.R12)
	a.Store(mg.R14, mg.RCX)
	a.AddImm(mg.R10, 2)
	barrier(a, "b2")
	a.Cmp(mg.RDI, mg.R13)
	a.J(mg.NotEqual, "next")
	a.MovImm(mg.RDX, pageC)
	a.Load(mg.RCX, mg.RDX)
	a.MovImm(mg.RDX, pageC+8)
	a.Load(mg.RAX, mg.RDX)
	a.Add(mg.RCX, mg.RAX) // r1 + r2 == 0 iff both saw 0 (each is 0 or 1)
	a.Cmp(mg.RCX, mg.R13)
	a.J(mg.NotEqual, "next")
	a.Inc(mg.R9)
	a.Label("next")
	a.Inc(mg.R8)
	a.MovImm(mg.RDX, uint64(iters))
	a.Cmp(mg.R8, mg.RDX)
	a.J(mg.Below, "iter")
	a.Cmp(mg.RDI, mg.R13)
	a.J(mg.NotEqual, "end")
	a.Mov(mg.RAX, mg.R9)
	a.Out(portReport)
	a.Mov(mg.RAX, mg.R8)
	a.Out(portReport)
	a.Label("end")
	return finish(a)
}

// buildBarrier: all vCPUs run iters rounds; in round r each writes r to
// its slot (its own page), passes a barrier on pageD, then checks every
// slot holds >= r; each vCPU reports its error count. The barrier count
// ends at ncpu*iters; pageC gets each vCPU's lock-xadd'ed round total.
func buildBarrier(iters int) []byte {
	a := mg.NewAsm()
	a.Xor(mg.R13, mg.R13)
	a.Xor(mg.R10, mg.R10) // target
	a.Xor(mg.R9, mg.R9)   // errors
	a.MovImm(mg.R8, 1)    // round
	a.MovImm(mg.R15, uint64(iters+1))
	a.Mov(mg.RBX, mg.RDI) // own slot = pageE + id*4096
	a.Shl(mg.RBX, 12)
	a.MovImm(mg.RAX, pageE)
	a.Add(mg.RBX, mg.RAX)
	a.Label("round")
	a.Store(mg.RBX, mg.R8)
	a.Add(mg.R10, mg.RSI)
	barrier(a, "bar")
	a.MovImm(mg.RAX, pageC)
	a.MovImm(mg.RCX, 1)
	a.LockXadd(mg.RAX, mg.RCX)
	a.MovImm(mg.R12, pageE) // check all slots
	a.Xor(mg.RCX, mg.RCX)
	a.Label("check")
	a.Load(mg.RAX, mg.R12)
	a.Cmp(mg.RAX, mg.R8)
	a.J(mg.AboveOrEqual, "slot_ok")
	a.Inc(mg.R9)
	a.Label("slot_ok")
	a.AddImm(mg.R12, 0x1000)
	a.Inc(mg.RCX)
	a.Cmp(mg.RCX, mg.RSI)
	a.J(mg.Below, "check")
	a.Inc(mg.R8)
	a.Cmp(mg.R8, mg.R15)
	a.J(mg.Below, "round")
	a.Mov(mg.RAX, mg.R9)
	a.Out(portReport)
	return finish(a)
}

// buildPingPong: vCPUs take turns (turn counter at pageA): vCPU i waits
// for turn == i + k*ncpu, increments a non-atomic counter next to the turn
// (pageA+8) and one on pageB, and passes the turn on. Every turn moves
// both pages to the next vCPU.
func buildPingPong(iters int) []byte {
	a := mg.NewAsm()
	a.MovImm(mg.RBX, pageA)
	a.MovImm(mg.R12, pageA+8)
	a.MovImm(mg.R14, pageB)
	a.Mov(mg.R8, mg.RDI) // my next turn
	a.MovImm(mg.RCX, uint64(iters))
	a.Label("turn")
	spinUntilEq(a, mg.RBX, mg.R8, "wait")
	a.Load(mg.RDX, mg.R12)
	a.Inc(mg.RDX)
	a.Store(mg.R12, mg.RDX)
	a.Load(mg.RDX, mg.R14)
	a.Inc(mg.RDX)
	a.Store(mg.R14, mg.RDX)
	a.Mov(mg.RDX, mg.R8)
	a.Inc(mg.RDX)
	a.Store(mg.RBX, mg.RDX)
	a.Add(mg.R8, mg.RSI)
	a.AddImm(mg.RCX, -1)
	a.J(mg.NotEqual, "turn")
	return finish(a)
}

// buildPrivate: a low-sharing compute kernel. Each vCPU sums i*i for
// i < iters*1024 in registers, stores the result to its own page and
// reports it.
func buildPrivate(iters int) []byte {
	a := mg.NewAsm()
	a.MovImm(mg.RDX, uint64(iters)*1024)
	a.Xor(mg.RBX, mg.RBX)
	a.Xor(mg.R8, mg.R8)
	a.Label("loop")
	a.Mov(mg.RAX, mg.RBX)
	a.Imul(mg.RAX, mg.RBX)
	a.Add(mg.R8, mg.RAX)
	a.Inc(mg.RBX)
	a.Cmp(mg.RBX, mg.RDX)
	a.J(mg.Below, "loop")
	a.Mov(mg.R12, mg.RDI)
	a.Shl(mg.R12, 12)
	a.MovImm(mg.RAX, pageE)
	a.Add(mg.R12, mg.RAX)
	a.Store(mg.R12, mg.R8)
	a.Mov(mg.RAX, mg.R8)
	a.Out(portReport)
	return finish(a)
}

func privateSum(iters int) uint32 {
	var s uint64
	for i := uint64(0); i < uint64(iters)*1024; i++ {
		s += i * i
	}
	return uint32(s)
}

// LookupProgram returns the built-in micro-guest called name.
func LookupProgram(name string) (Builtin, error) {
	p, ok := programs[name]
	if !ok {
		return Builtin{}, fmt.Errorf("dsm: no built-in program %q (known: %s)", name, strings.Join(ProgramNames(), ", "))
	}
	return p, nil
}

// ProgramNames lists the built-in micro-guests.
func ProgramNames() []string {
	var names []string
	for n := range programs {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func mustProgram(name string) Builtin {
	p, err := LookupProgram(name)
	if err != nil {
		panic(err)
	}
	return p
}

// PrivateSum is what each vCPU of the "private" program reports for iters.
func PrivateSum(iters int) uint32 { return privateSum(iters) }
