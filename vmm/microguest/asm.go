// Package microguest builds small x86-64 test guests ("micro-guests") in Go:
// a minimal assembler for the handful of instructions the tests need, and the
// page tables and segment state that start a vCPU in 64-bit long mode at
// CPL3. Work at CPL3 runs natively under PVM (these machines' KVM) and under
// hardware virtualization alike, so the same tests are fast everywhere.
package microguest

import (
	"encoding/binary"
	"fmt"
)

// Reg is a 64-bit general-purpose register number (x86 encoding order).
type Reg uint8

// General-purpose registers.
const (
	RAX Reg = iota
	RCX
	RDX
	RBX
	RSP
	RBP
	RSI
	RDI
	R8
	R9
	R10
	R11
	R12
	R13
	R14
	R15
)

// Cond is a Jcc condition code (low nibble of 0F 8x).
type Cond uint8

// Conditions.
const (
	Below        Cond = 0x2 // unsigned <
	AboveOrEqual Cond = 0x3 // unsigned >=
	Equal        Cond = 0x4
	NotEqual     Cond = 0x5
	BelowOrEqual Cond = 0x6
	Above        Cond = 0x7
)

// Asm assembles position-dependent 64-bit code. Labels may be used before
// they are defined; Bytes resolves them.
type Asm struct {
	buf    []byte
	labels map[string]int
	fixups []fixup
}

type fixup struct {
	at    int // offset of the rel32 field
	label string
}

// NewAsm returns an empty assembler.
func NewAsm() *Asm { return &Asm{labels: map[string]int{}} }

func (a *Asm) emit(b ...byte) { a.buf = append(a.buf, b...) }

func rex(w bool, reg, rm Reg) byte {
	b := byte(0x40)
	if w {
		b |= 8
	}
	if reg&8 != 0 {
		b |= 4
	}
	if rm&8 != 0 {
		b |= 1
	}
	return b
}

// modrmReg emits a register-direct ModRM (mod=11).
func (a *Asm) modrmReg(reg, rm Reg) { a.emit(0xC0 | byte(reg&7)<<3 | byte(rm&7)) }

// modrmMem emits ModRM (+SIB/disp) for [base].
func (a *Asm) modrmMem(reg, base Reg) {
	switch base & 7 {
	case 4: // rsp/r12 need a SIB byte
		a.emit(byte(reg&7)<<3|4, 0x24)
	case 5: // rbp/r13 with mod=00 would mean RIP-relative: use disp8 0
		a.emit(0x40|byte(reg&7)<<3|5, 0)
	default:
		a.emit(byte(reg&7)<<3 | byte(base&7))
	}
}

func (a *Asm) rr(op byte, dst, src Reg) { // op r/m64(dst), r64(src)
	a.emit(rex(true, src, dst), op)
	a.modrmReg(src, dst)
}

// MovImm loads a 64-bit immediate: mov r64, imm64.
func (a *Asm) MovImm(r Reg, v uint64) {
	a.emit(rex(true, 0, r), 0xB8+byte(r&7))
	a.buf = binary.LittleEndian.AppendUint64(a.buf, v)
}

// Mov copies a register: mov dst, src.
func (a *Asm) Mov(dst, src Reg) { a.rr(0x89, dst, src) }

// Store writes a qword: mov [base], src.
func (a *Asm) Store(base, src Reg) {
	a.emit(rex(true, src, base), 0x89)
	a.modrmMem(src, base)
}

// Load reads a qword: mov dst, [base].
func (a *Asm) Load(dst, base Reg) {
	a.emit(rex(true, dst, base), 0x8B)
	a.modrmMem(dst, base)
}

// Store32 writes a dword: mov [base], src32.
func (a *Asm) Store32(base, src Reg) {
	if src&8 != 0 || base&8 != 0 {
		a.emit(rex(false, src, base))
	}
	a.emit(0x89)
	a.modrmMem(src, base)
}

// Load32 reads a dword, zero-extended: mov dst32, [base].
func (a *Asm) Load32(dst, base Reg) {
	if dst&8 != 0 || base&8 != 0 {
		a.emit(rex(false, dst, base))
	}
	a.emit(0x8B)
	a.modrmMem(dst, base)
}

// Add: dst += src.
func (a *Asm) Add(dst, src Reg) { a.rr(0x01, dst, src) }

// Sub: dst -= src.
func (a *Asm) Sub(dst, src Reg) { a.rr(0x29, dst, src) }

// Xor: dst ^= src.
func (a *Asm) Xor(dst, src Reg) { a.rr(0x31, dst, src) }

// Cmp compares x with y (flags as for x - y).
func (a *Asm) Cmp(x, y Reg) { a.rr(0x39, x, y) }

// AddImm: dst += imm (sign-extended 32-bit immediate).
func (a *Asm) AddImm(dst Reg, imm int32) {
	a.emit(rex(true, 0, dst), 0x81)
	a.modrmReg(0, dst)
	a.buf = binary.LittleEndian.AppendUint32(a.buf, uint32(imm))
}

// Imul: dst *= src (low 64 bits).
func (a *Asm) Imul(dst, src Reg) {
	a.emit(rex(true, dst, src), 0x0F, 0xAF)
	a.modrmReg(dst, src)
}

// Shl shifts dst left by an immediate count.
func (a *Asm) Shl(dst Reg, n uint8) {
	a.emit(rex(true, 0, dst), 0xC1)
	a.modrmReg(4, dst)
	a.emit(n)
}

// Inc: dst++.
func (a *Asm) Inc(dst Reg) {
	a.emit(rex(true, 0, dst), 0xFF)
	a.modrmReg(0, dst)
}

// LockInc atomically increments the qword at [base]: lock inc qword [base].
func (a *Asm) LockInc(base Reg) {
	a.emit(0xF0, rex(true, 0, base), 0xFF)
	a.modrmMem(0, base)
}

// LockXadd atomically exchanges and adds: lock xadd [base], src.
func (a *Asm) LockXadd(base, src Reg) {
	a.emit(0xF0, rex(true, src, base), 0x0F, 0xC1)
	a.modrmMem(src, base)
}

// LockCmpxchg: if [base] == rax then [base] = src else rax = [base].
func (a *Asm) LockCmpxchg(base, src Reg) {
	a.emit(0xF0, rex(true, src, base), 0x0F, 0xB1)
	a.modrmMem(src, base)
}

// Xchg swaps src with [base] (implicitly locked).
func (a *Asm) Xchg(base, src Reg) {
	a.emit(rex(true, src, base), 0x87)
	a.modrmMem(src, base)
}

// Mfence is a full memory barrier.
func (a *Asm) Mfence() { a.emit(0x0F, 0xAE, 0xF0) }

// Pause is the spin-wait hint.
func (a *Asm) Pause() { a.emit(0xF3, 0x90) }

// Rdtsc reads the TSC into edx:eax.
func (a *Asm) Rdtsc() { a.emit(0x0F, 0x31) }

// Out writes eax to an I/O port (exit KVM_EXIT_IO; needs IOPL 3 at CPL3).
func (a *Asm) Out(port uint16) {
	a.emit(0x66, 0xBA) // mov dx, imm16
	a.buf = binary.LittleEndian.AppendUint16(a.buf, port)
	a.emit(0xEF) // out dx, eax
}

// In reads a dword from an I/O port into eax.
func (a *Asm) In(port uint16) {
	a.emit(0x66, 0xBA)
	a.buf = binary.LittleEndian.AppendUint16(a.buf, port)
	a.emit(0xED) // in eax, dx
}

// Raw emits machine code bytes as given, for instructions the assembler
// has no method for (e.g. rep outsb F3 6E, iretq 48 CF).
func (a *Asm) Raw(b ...byte) { a.emit(b...) }

// Label defines name at the current position.
func (a *Asm) Label(name string) { a.labels[name] = len(a.buf) }

// Jmp jumps to a label.
func (a *Asm) Jmp(label string) {
	a.emit(0xE9)
	a.rel(label)
}

// J jumps to a label if cond holds.
func (a *Asm) J(cond Cond, label string) {
	a.emit(0x0F, 0x80|byte(cond))
	a.rel(label)
}

func (a *Asm) rel(label string) {
	a.fixups = append(a.fixups, fixup{at: len(a.buf), label: label})
	a.emit(0, 0, 0, 0)
}

// Bytes returns the machine code with labels resolved.
func (a *Asm) Bytes() ([]byte, error) {
	out := append([]byte(nil), a.buf...)
	for _, f := range a.fixups {
		target, ok := a.labels[f.label]
		if !ok {
			return nil, fmt.Errorf("microguest: undefined label %q", f.label)
		}
		binary.LittleEndian.PutUint32(out[f.at:], uint32(int32(target-(f.at+4))))
	}
	return out, nil
}

// MustBytes is Bytes for code built by tests, where a bad label is a bug.
func (a *Asm) MustBytes() []byte {
	b, err := a.Bytes()
	if err != nil {
		panic(err)
	}
	return b
}
