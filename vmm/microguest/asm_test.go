package microguest

import (
	"bytes"
	"testing"
)

// Expected encodings were checked against the Intel SDM opcode tables.
func TestEncodings(t *testing.T) {
	tests := []struct {
		name string
		gen  func(a *Asm)
		want []byte
	}{
		{"mov rax, imm64", func(a *Asm) { a.MovImm(RAX, 0x1122334455667788) }, []byte{0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11}},
		{"mov r9, imm64", func(a *Asm) { a.MovImm(R9, 1) }, []byte{0x49, 0xB9, 1, 0, 0, 0, 0, 0, 0, 0}},
		{"mov [rbx], rax", func(a *Asm) { a.Store(RBX, RAX) }, []byte{0x48, 0x89, 0x03}},
		{"mov [rsp], rax", func(a *Asm) { a.Store(RSP, RAX) }, []byte{0x48, 0x89, 0x04, 0x24}},
		{"mov [rbp], rax", func(a *Asm) { a.Store(RBP, RAX) }, []byte{0x48, 0x89, 0x45, 0x00}},
		{"mov rcx, [r8]", func(a *Asm) { a.Load(RCX, R8) }, []byte{0x49, 0x8B, 0x08}},
		{"add rax, rbx", func(a *Asm) { a.Add(RAX, RBX) }, []byte{0x48, 0x01, 0xD8}},
		{"cmp rcx, rdx", func(a *Asm) { a.Cmp(RCX, RDX) }, []byte{0x48, 0x39, 0xD1}},
		{"add rsi, 8", func(a *Asm) { a.AddImm(RSI, 8) }, []byte{0x48, 0x81, 0xC6, 8, 0, 0, 0}},
		{"imul rax, rcx", func(a *Asm) { a.Imul(RAX, RCX) }, []byte{0x48, 0x0F, 0xAF, 0xC1}},
		{"lock inc qword [rdi]", func(a *Asm) { a.LockInc(RDI) }, []byte{0xF0, 0x48, 0xFF, 0x07}},
		{"lock xadd [rdi], rax", func(a *Asm) { a.LockXadd(RDI, RAX) }, []byte{0xF0, 0x48, 0x0F, 0xC1, 0x07}},
		{"xchg [rdi], rax", func(a *Asm) { a.Xchg(RDI, RAX) }, []byte{0x48, 0x87, 0x07}},
		{"shl rax, 40", func(a *Asm) { a.Shl(RAX, 40) }, []byte{0x48, 0xC1, 0xE0, 40}},
		{"out 0x10, eax", func(a *Asm) { a.Out(0x10) }, []byte{0x66, 0xBA, 0x10, 0x00, 0xEF}},
		{"self jmp", func(a *Asm) { a.Label("x"); a.Jmp("x") }, []byte{0xE9, 0xFB, 0xFF, 0xFF, 0xFF}},
		{"forward jne", func(a *Asm) { a.J(NotEqual, "y"); a.Label("y") }, []byte{0x0F, 0x85, 0, 0, 0, 0}},
		{"raw iretq after a label", func(a *Asm) { a.Raw(0x48, 0xCF); a.Label("z"); a.Jmp("z") }, []byte{0x48, 0xCF, 0xE9, 0xFB, 0xFF, 0xFF, 0xFF}},
	}
	for _, tt := range tests {
		a := NewAsm()
		tt.gen(a)
		got, err := a.Bytes()
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if !bytes.Equal(got, tt.want) {
			t.Errorf("%s: got % x want % x", tt.name, got, tt.want)
		}
	}
}

func TestUndefinedLabel(t *testing.T) {
	a := NewAsm()
	a.Jmp("nowhere")
	if _, err := a.Bytes(); err == nil {
		t.Fatal("undefined label not reported")
	}
}
