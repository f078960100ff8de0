package dsm

import (
	"fmt"

	. "github.com/hpcvm/hpcvm/vmm/microguest"
)

// Micro-guest ports and data pages used by the tests. Each variable is on
// its own page so pages have different homes.
const (
	portReport = 0x10
	portDone   = 0x11

	pageA = DataAddr
	pageB = DataAddr + 0x1000
	pageC = DataAddr + 0x2000
	pageD = DataAddr + 0x3000
	pageE = DataAddr + 0x4000 // + vCPU id * 0x1000: per-vCPU slots
)

// program is a named test guest: code for iters iterations, and the
// guest-physical addresses whose final qwords the test checks.
type program struct {
	build  func(iters int) []byte
	finals []uint64
}

var programs = map[string]program{
	"lockinc":   {buildLockInc, []uint64{pageA}},
	"spinlock":  {buildSpinlock, []uint64{pageB, pageA + 8}},
	"mp":        {buildMessagePassing, nil},
	"sb-mfence": {func(n int) []byte { return buildStoreBuffering(n, true) }, nil},
	"sb":        {func(n int) []byte { return buildStoreBuffering(n, false) }, nil},
	"barrier":   {buildBarrier, []uint64{pageC}},
	"pingpong":  {buildPingPong, []uint64{pageA, pageA + 8, pageB}},
	"private":   {buildPrivate, nil},
}

func finish(a *Asm) []byte {
	a.Out(portDone)
	a.Label("spin_forever")
	a.Pause()
	a.Jmp("spin_forever")
	return a.MustBytes()
}

// buildLockInc: every vCPU does iters `lock inc` on one qword.
func buildLockInc(iters int) []byte {
	a := NewAsm()
	a.MovImm(RBX, pageA)
	a.MovImm(RCX, uint64(iters))
	a.Label("loop")
	a.LockInc(RBX)
	a.AddImm(RCX, -1)
	a.J(NotEqual, "loop")
	return finish(a)
}

// spinAcquire takes the xchg spinlock at [lock] (zero is R13).
func spinAcquire(a *Asm, lock Reg, tag string) {
	a.Label(tag + "_try")
	a.MovImm(RAX, 1)
	a.Xchg(lock, RAX)
	a.Cmp(RAX, R13)
	a.J(Equal, tag+"_locked")
	a.Label(tag + "_wait")
	a.Pause()
	a.Load(RAX, lock)
	a.Cmp(RAX, R13)
	a.J(NotEqual, tag+"_wait")
	a.Jmp(tag + "_try")
	a.Label(tag + "_locked")
}

// buildSpinlock: an xchg spinlock at pageA protects two non-atomic
// counters, one on another page (pageB) and one next to the lock.
func buildSpinlock(iters int) []byte {
	a := NewAsm()
	a.Xor(R13, R13)
	a.MovImm(RBX, pageA)
	a.MovImm(R12, pageB)
	a.MovImm(R14, pageA+8)
	a.MovImm(RCX, uint64(iters))
	a.Label("outer")
	spinAcquire(a, RBX, "lk")
	a.Load(RDX, R12)
	a.Inc(RDX)
	a.Store(R12, RDX)
	a.Load(RDX, R14)
	a.Inc(RDX)
	a.Store(R14, RDX)
	a.Store(RBX, R13) // release: a plain store under TSO
	a.AddImm(RCX, -1)
	a.J(NotEqual, "outer")
	return finish(a)
}

// spinUntilEq waits until [addr] == want.
func spinUntilEq(a *Asm, addr, want Reg, tag string) {
	a.Label(tag)
	a.Load(RAX, addr)
	a.Cmp(RAX, want)
	a.J(Equal, tag+"_ok")
	a.Pause()
	a.Jmp(tag)
	a.Label(tag + "_ok")
}

// buildMessagePassing: vCPU 0 writes data=k (pageA) then flag=k (pageB)
// and waits for ack=k (pageC); vCPU 1 waits for flag=k, checks data==k
// (counting stale reads), and acks. vCPU 1 reports its error count.
func buildMessagePassing(iters int) []byte {
	a := NewAsm()
	a.Xor(R13, R13)
	a.MovImm(RBX, pageA)
	a.MovImm(R12, pageB)
	a.MovImm(R14, pageC)
	a.MovImm(R15, uint64(iters+1))
	a.MovImm(R8, 1)
	a.Xor(R9, R9)
	a.Cmp(RDI, R13)
	a.J(Equal, "writer")
	a.MovImm(R10, 1)
	a.Cmp(RDI, R10)
	a.J(Equal, "reader")
	a.Jmp("end")

	a.Label("writer")
	a.Store(RBX, R8)
	a.Store(R12, R8)
	spinUntilEq(a, R14, R8, "wack")
	a.Inc(R8)
	a.Cmp(R8, R15)
	a.J(Below, "writer")
	a.Jmp("end")

	a.Label("reader")
	spinUntilEq(a, R12, R8, "rflag")
	a.Load(RDX, RBX)
	a.Cmp(RDX, R8)
	a.J(Equal, "rok")
	a.Inc(R9)
	a.Label("rok")
	a.Store(R14, R8)
	a.Inc(R8)
	a.Cmp(R8, R15)
	a.J(Below, "reader")
	a.Mov(RAX, R9)
	a.Out(portReport)
	a.Label("end")
	return finish(a)
}

// barrier2 is a counting barrier on [pageD] for participants counted in
// R11: lock xadd 1, then wait until the count reaches target (R10).
func barrier(a *Asm, tag string) {
	a.MovImm(RDX, pageD)
	a.MovImm(RAX, 1)
	a.LockXadd(RDX, RAX)
	a.Label(tag)
	a.Load(RAX, RDX)
	a.Cmp(RAX, R10)
	a.J(AboveOrEqual, tag+"_ok")
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
	a := NewAsm()
	a.Xor(R13, R13)
	a.MovImm(R15, 2)
	a.Cmp(RDI, R15)
	a.J(AboveOrEqual, "end") // only vCPUs 0 and 1 take part
	a.Xor(R10, R10)          // barrier target
	a.Xor(R9, R9)            // both-zero count
	a.Xor(R8, R8)            // iteration
	a.MovImm(RBX, pageA)     // own variable
	a.MovImm(R12, pageB)     // other's variable
	a.MovImm(R14, pageC)     // own result slot
	a.Cmp(RDI, R13)
	a.J(Equal, "setup_done")
	a.MovImm(RBX, pageB)
	a.MovImm(R12, pageA)
	a.MovImm(R14, pageC+8)
	a.Label("setup_done")
	a.MovImm(R11, 1)

	a.Label("iter")
	a.Store(RBX, R13)
	a.AddImm(R10, 2)
	barrier(a, "b1")
	a.Store(RBX, R11)
	if fence {
		a.Mfence()
	}
	a.Load(RCX, R12)
	a.Store(R14, RCX)
	a.AddImm(R10, 2)
	barrier(a, "b2")
	a.Cmp(RDI, R13)
	a.J(NotEqual, "next")
	a.MovImm(RDX, pageC)
	a.Load(RCX, RDX)
	a.MovImm(RDX, pageC+8)
	a.Load(RAX, RDX)
	a.Add(RCX, RAX) // r1 + r2 == 0 iff both saw 0 (each is 0 or 1)
	a.Cmp(RCX, R13)
	a.J(NotEqual, "next")
	a.Inc(R9)
	a.Label("next")
	a.Inc(R8)
	a.MovImm(RDX, uint64(iters))
	a.Cmp(R8, RDX)
	a.J(Below, "iter")
	a.Cmp(RDI, R13)
	a.J(NotEqual, "end")
	a.Mov(RAX, R9)
	a.Out(portReport)
	a.Mov(RAX, R8)
	a.Out(portReport)
	a.Label("end")
	return finish(a)
}

// buildBarrier: all vCPUs run iters rounds; in round r each writes r to
// its slot (its own page), passes a barrier on pageD, then checks every
// slot holds >= r; each vCPU reports its error count. The barrier count
// ends at ncpu*iters; pageC gets each vCPU's lock-xadd'ed round total.
func buildBarrier(iters int) []byte {
	a := NewAsm()
	a.Xor(R13, R13)
	a.Xor(R10, R10) // target
	a.Xor(R9, R9)   // errors
	a.MovImm(R8, 1) // round
	a.MovImm(R15, uint64(iters+1))
	a.Mov(RBX, RDI) // own slot = pageE + id*4096
	a.Shl(RBX, 12)
	a.MovImm(RAX, pageE)
	a.Add(RBX, RAX)
	a.Label("round")
	a.Store(RBX, R8)
	a.Add(R10, RSI)
	barrier(a, "bar")
	a.MovImm(RAX, pageC)
	a.MovImm(RCX, 1)
	a.LockXadd(RAX, RCX)
	a.MovImm(R12, pageE) // check all slots
	a.Xor(RCX, RCX)
	a.Label("check")
	a.Load(RAX, R12)
	a.Cmp(RAX, R8)
	a.J(AboveOrEqual, "slot_ok")
	a.Inc(R9)
	a.Label("slot_ok")
	a.AddImm(R12, 0x1000)
	a.Inc(RCX)
	a.Cmp(RCX, RSI)
	a.J(Below, "check")
	a.Inc(R8)
	a.Cmp(R8, R15)
	a.J(Below, "round")
	a.Mov(RAX, R9)
	a.Out(portReport)
	return finish(a)
}

// buildPingPong: vCPUs take turns (turn counter at pageA): vCPU i waits
// for turn == i + k*ncpu, increments a non-atomic counter next to the turn
// (pageA+8) and one on pageB, and passes the turn on. Every turn moves
// both pages to the next vCPU.
func buildPingPong(iters int) []byte {
	a := NewAsm()
	a.MovImm(RBX, pageA)
	a.MovImm(R12, pageA+8)
	a.MovImm(R14, pageB)
	a.Mov(R8, RDI) // my next turn
	a.MovImm(RCX, uint64(iters))
	a.Label("turn")
	spinUntilEq(a, RBX, R8, "wait")
	a.Load(RDX, R12)
	a.Inc(RDX)
	a.Store(R12, RDX)
	a.Load(RDX, R14)
	a.Inc(RDX)
	a.Store(R14, RDX)
	a.Mov(RDX, R8)
	a.Inc(RDX)
	a.Store(RBX, RDX)
	a.Add(R8, RSI)
	a.AddImm(RCX, -1)
	a.J(NotEqual, "turn")
	return finish(a)
}

// buildPrivate: a low-sharing compute kernel. Each vCPU sums i*i for
// i < iters*1024 in registers, stores the result to its own page and
// reports it.
func buildPrivate(iters int) []byte {
	a := NewAsm()
	a.MovImm(RDX, uint64(iters)*1024)
	a.Xor(RBX, RBX)
	a.Xor(R8, R8)
	a.Label("loop")
	a.Mov(RAX, RBX)
	a.Imul(RAX, RBX)
	a.Add(R8, RAX)
	a.Inc(RBX)
	a.Cmp(RBX, RDX)
	a.J(Below, "loop")
	a.Mov(R12, RDI)
	a.Shl(R12, 12)
	a.MovImm(RAX, pageE)
	a.Add(R12, RAX)
	a.Store(R12, R8)
	a.Mov(RAX, R8)
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

func mustProgram(name string) program {
	p, ok := programs[name]
	if !ok {
		panic(fmt.Sprintf("no test program %q", name))
	}
	return p
}
