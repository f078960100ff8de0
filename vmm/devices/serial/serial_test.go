package serial

import (
	"bytes"
	"log/slog"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
)

type countIRQ struct{ n atomic.Int64 }

func (c *countIRQ) Trigger() error { c.n.Add(1); return nil }

func newSerial() (*Serial, *bytes.Buffer, *countIRQ) {
	var out bytes.Buffer
	irq := &countIRQ{}
	return New(&out, irq, slog.New(slog.DiscardHandler)), &out, irq
}

func rd(s *Serial, off uint64) byte {
	b := []byte{0}
	s.Read(off, b)
	return b[0]
}

func wr(s *Serial, off uint64, v byte) { s.Write(off, []byte{v}) }

func TestOutput(t *testing.T) {
	s, out, irq := newSerial()
	for _, c := range []byte("hello\n") {
		wr(s, regData, c)
	}
	if out.String() != "hello\n" {
		t.Errorf("output %q, want %q", out.String(), "hello\n")
	}
	if irq.n.Load() != 0 {
		t.Errorf("%d interrupts with IER=0, want none", irq.n.Load())
	}
	if got := rd(s, regLSR); got != lsrTHRE|lsrTEMT {
		t.Errorf("idle LSR = %#x, want %#x", got, lsrTHRE|lsrTEMT)
	}
}

func TestDivisorLatch(t *testing.T) {
	s, out, _ := newSerial()
	wr(s, regLCR, lcrDLAB|0x03)
	wr(s, regData, 0x01)
	wr(s, regIER, 0x02)
	if rd(s, regData) != 0x01 || rd(s, regIER) != 0x02 {
		t.Error("divisor latch did not read back")
	}
	if out.Len() != 0 {
		t.Error("a DLL write was transmitted")
	}
	wr(s, regLCR, 0x03)
	if rd(s, regIER) != 0 {
		t.Error("IER changed by a DLM write")
	}
}

func TestRegisterReadback(t *testing.T) {
	tests := []struct {
		name  string
		reg   uint64
		write byte
		want  byte
	}{
		{"scratch", regSCR, 0xa5, 0xa5},
		{"IER keeps low nibble", regIER, 0xff, 0x0f},
		{"LCR", regLCR, 0x1b, 0x1b},
		{"MCR", regMCR, 0x0b, 0x0b},
	}
	for _, tt := range tests {
		s, _, _ := newSerial()
		wr(s, tt.reg, tt.write)
		if got := rd(s, tt.reg); got != tt.want {
			t.Errorf("%s: read %#x, want %#x", tt.name, got, tt.want)
		}
	}
}

func TestLoopbackMSR(t *testing.T) {
	s, out, _ := newSerial()
	// Linux's probe: loopback with RTS|OUT2 must show CTS|DCD.
	wr(s, regMCR, mcrLoop|0x0a)
	if got := rd(s, regMSR) & 0xf0; got != 0x90 {
		t.Errorf("loopback MSR = %#x, want 0x90", got)
	}
	wr(s, regData, 'x')
	if out.Len() != 0 || rd(s, regData) != 'x' {
		t.Error("loopback byte was not looped back")
	}
	wr(s, regMCR, 0x0b)
	if got := rd(s, regMSR); got != msrDCD|msrDSR|msrCTS {
		t.Errorf("MSR = %#x, want carrier, DSR, CTS", got)
	}
}

func TestIIRFIFOBits(t *testing.T) {
	s, _, _ := newSerial()
	if got := rd(s, regIIR); got != iirNone {
		t.Errorf("IIR = %#x, want %#x", got, iirNone)
	}
	wr(s, regIIR, fcrEnable)
	if got := rd(s, regIIR); got != iirFIFOEn|iirNone {
		t.Errorf("IIR with FIFO = %#x, want %#x (16550A)", got, iirFIFOEn|iirNone)
	}
}

// TestTHREInterrupt follows Linux's serial8250_startup THRE probe and the
// interrupt-driven transmit path.
func TestTHREInterrupt(t *testing.T) {
	s, out, irq := newSerial()
	wr(s, regIER, ierTHRE)
	iir1 := rd(s, regIIR)
	wr(s, regIER, 0)
	wr(s, regIER, ierTHRE)
	iir2 := rd(s, regIIR)
	wr(s, regIER, 0)
	if iir1 != iirTHRE || iir2 != iirTHRE {
		t.Fatalf("THRE probe IIRs = %#x, %#x, want %#x both (else Linux sets UART_BUG_THRE)", iir1, iir2, iirTHRE)
	}
	if irq.n.Load() != 2 {
		t.Errorf("%d interrupts for two THRE enables, want 2", irq.n.Load())
	}

	// start_tx: enable THRI, handler writes a batch on each THRE interrupt.
	before := irq.n.Load()
	wr(s, regIER, ierTHRE|ierRDA)
	if irq.n.Load() != before+1 {
		t.Fatal("enabling THRI did not interrupt")
	}
	msg := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	for len(msg) > 0 {
		if rd(s, regIIR) != iirTHRE {
			t.Fatal("handler found no THRE interrupt")
		}
		n := min(16, len(msg))
		for _, c := range msg[:n] {
			wr(s, regData, c)
		}
		msg = msg[n:]
	}
	wr(s, regIER, ierRDA) // stop_tx
	if rd(s, regIIR) != iirNone {
		t.Error("interrupt still pending after stop_tx")
	}
	if out.String() != "0123456789abcdefghijklmnopqrstuvwxyz" {
		t.Errorf("output %q", out.String())
	}
}

func TestInput(t *testing.T) {
	s, _, irq := newSerial()
	if n := s.Input([]byte("ab")); n != 2 {
		t.Fatalf("Input took %d bytes, want 2", n)
	}
	if irq.n.Load() != 0 {
		t.Error("interrupt with RX interrupts disabled")
	}
	wr(s, regIER, ierRDA)
	if irq.n.Load() != 1 {
		t.Fatal("enabling RDA with data queued did not interrupt")
	}
	if got := rd(s, regIIR); got != iirRDA {
		t.Errorf("IIR = %#x, want RDA", got)
	}
	var got []byte
	for rd(s, regLSR)&lsrDR != 0 {
		got = append(got, rd(s, regData))
	}
	if string(got) != "ab" {
		t.Errorf("read %q, want %q", got, "ab")
	}
	if rd(s, regIIR) != iirNone {
		t.Error("RDA still pending after draining")
	}
	s.Input([]byte("c"))
	if irq.n.Load() != 2 {
		t.Errorf("new input after drain: %d interrupts, want 2", irq.n.Load())
	}
	big := make([]byte, rxMax+10)
	if n := s.Input(big); n != rxMax-1 {
		t.Errorf("Input of an over-full buffer took %d bytes, want %d", n, rxMax-1)
	}
}

func TestPump(t *testing.T) {
	s, _, _ := newSerial()
	wr(s, regIER, ierRDA)
	want := strings.Repeat("0123456789", rxMax/5) // twice the buffer
	done := make(chan error, 1)
	go func() { done <- s.Pump(strings.NewReader(want)) }()
	var got []byte
	for len(got) < len(want) {
		if rd(s, regLSR)&lsrDR != 0 {
			got = append(got, rd(s, regData))
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Error("pumped input arrived corrupted")
	}
	s.Close()
	if err := s.Pump(strings.NewReader(strings.Repeat("x", rxMax+1))); err != ErrClosed {
		t.Errorf("Pump after Close = %v, want ErrClosed", err)
	}
}

func TestState(t *testing.T) {
	s, _, _ := newSerial()
	wr(s, regLCR, 0x03)
	wr(s, regIER, ierRDA)
	wr(s, regSCR, 7)
	s.Input([]byte("xyz"))
	st := s.State()
	s2, _, irq2 := newSerial()
	if err := s2.Restore(st); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(s2.State(), st) {
		t.Errorf("restored state %+v, want %+v", s2.State(), st)
	}
	if irq2.n.Load() != 1 {
		t.Error("pending RX interrupt not re-delivered on restore")
	}
	if rd(s2, regData) != 'x' {
		t.Error("queued input lost in restore")
	}
	st.Version = 2
	if err := s2.Restore(st); err == nil {
		t.Error("restore accepted version 2")
	}
}
