package kvm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"testing"
)

func openOrSkip(t *testing.T) *System {
	t.Helper()
	s, err := Open()
	if err != nil {
		if _, serr := os.Stat(DevicePath); serr != nil || errors.Is(err, ErrUnavailable) {
			t.Skipf("needs a usable %s (root): %v", DevicePath, err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestStateRoundTrip(t *testing.T) {
	s := openOrSkip(t)
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	c, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	fpu := FPU{FCW: 0x37f, MXCSR: 0x1f80}
	fpu.XMM[3][5] = 0xAB
	if err := c.SetFPU(fpu); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetFPU()
	if err != nil {
		t.Fatal(err)
	}
	if got.FCW != fpu.FCW || got.XMM[3][5] != 0xAB {
		t.Errorf("FPU round trip: got FCW %#x XMM3[5] %#x", got.FCW, got.XMM[3][5])
	}
	// KVM_GET_FPU's MXCSR is not reliable (0 on this host's KVM while the
	// XSAVE area holds the real value), so check MXCSR through XSAVE.
	if err := c.SetMXCSR(0x1f00); err != nil {
		t.Fatal(err)
	}
	if xs, err := c.GetXSave(); err != nil || binary.LittleEndian.Uint32(xs[24:]) != 0x1f00 {
		t.Errorf("MXCSR in XSAVE after SetMXCSR(0x1f00) = %#x, %v", binary.LittleEndian.Uint32(xs[24:]), err)
	}

	xs, err := c.GetXSave()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetXSave(xs); err != nil {
		t.Fatal(err)
	}
	xs2, err := c.GetXSave()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(xs[:512], xs2[:512]) {
		t.Error("XSAVE legacy area changed across set/get")
	}
	if err := c.SetXSave(xs[:100]); err == nil {
		t.Error("SetXSave accepted a truncated area")
	}

	const msrTSCAux = 0xc0000103
	if err := c.SetMSRs([]MSREntry{{Index: msrTSCAux, Data: 7}}); err != nil {
		t.Fatal(err)
	}
	m, err := c.GetMSRs([]uint32{msrTSCAux})
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || m[0].Data != 7 {
		t.Errorf("TSC_AUX read back %+v, want 7", m)
	}
	if err := c.SetMSRs([]MSREntry{{Index: 0xdeadbeef, Data: 1}}); err == nil {
		t.Error("SetMSRs accepted a nonexistent MSR")
	}
}

func TestCapabilitiesAndCPUID(t *testing.T) {
	s := openOrSkip(t)
	if n, err := s.CheckExtension(CapImmediateExit); err != nil || n == 0 {
		t.Fatalf("KVM_CAP_IMMEDIATE_EXIT = %d, %v: kicking vCPUs needs it", n, err)
	}
	cpuid, err := s.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range cpuid {
		found = found || e.Function == 0
	}
	if !found {
		t.Fatalf("supported CPUID has no leaf 0: %d entries", len(cpuid))
	}
	msrs, err := s.MSRIndexList()
	if err != nil || len(msrs) == 0 {
		t.Fatalf("MSR index list: %d entries, %v", len(msrs), err)
	}
}

func TestIRQFDAndIOEventFDNeedIRQChip(t *testing.T) {
	s := openOrSkip(t)
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe() // not an eventfd: KVM must refuse it
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := vm.IRQFD(int(r.Fd()), 4, false); err == nil {
		t.Error("KVM_IRQFD accepted a pipe")
	}
	if err := vm.IRQLine(4, true); err != nil {
		t.Errorf("KVM_IRQ_LINE: %v", err)
	}
	if err := vm.IRQLine(4, false); err != nil {
		t.Errorf("KVM_IRQ_LINE: %v", err)
	}
	chip, err := vm.GetIRQChip(IRQChipIOAPIC)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.SetIRQChip(chip); err != nil {
		t.Fatal(err)
	}
}

func TestTSCKHz(t *testing.T) {
	s := openOrSkip(t)
	khz, err := s.TSCKHz()
	if err != nil {
		t.Fatal(err)
	}
	if khz == 0 {
		t.Fatal("TSC frequency 0 kHz")
	}
	t.Logf("TSC: %d kHz", khz)
}
