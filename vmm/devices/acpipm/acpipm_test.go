package acpipm

import (
	"encoding/binary"
	"log/slog"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/layout"
)

func word(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }

func TestWrites(t *testing.T) {
	s5 := uint16(layout.ACPIS5SleepType<<slpTypeSh | slpEnable)
	tests := []struct {
		name              string
		off               uint64
		data              []byte
		poweroffs, resets int
	}{
		{"S5 with SLP_EN (word)", offControl, word(s5), 1, 0},
		{"S5 with SLP_EN (high byte)", offControl + 1, []byte{byte(s5 >> 8)}, 1, 0},
		{"S5 without SLP_EN", offControl, word(layout.ACPIS5SleepType << slpTypeSh), 0, 0},
		{"S3 with SLP_EN", offControl, word(3<<slpTypeSh | slpEnable), 0, 0},
		{"reset value", offReset, []byte{layout.ACPIResetValue}, 0, 1},
		{"other reset value", offReset, []byte{0x06}, 0, 0},
		{"status write", offStatus, word(0xffff), 0, 0},
		{"enable write", offEnable, word(0x0100), 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var off, rst int
			p := New(func() { off++ }, func() { rst++ }, slog.New(slog.DiscardHandler))
			p.Write(tt.off, tt.data)
			if off != tt.poweroffs || rst != tt.resets {
				t.Errorf("poweroffs %d resets %d, want %d %d", off, rst, tt.poweroffs, tt.resets)
			}
		})
	}
}

// TestControlReadsACPIMode checks SCI_EN reads as set, which tells the guest
// the machine is already in ACPI mode (there is no SMI command port).
func TestControlReadsACPIMode(t *testing.T) {
	p := New(nil, nil, slog.New(slog.DiscardHandler))
	b := make([]byte, 2)
	p.Read(offControl, b)
	if binary.LittleEndian.Uint16(b)&sciEnable == 0 {
		t.Fatalf("PM1_CNT = %#x, want SCI_EN set", b)
	}
	p.Write(offControl, word(0))
	p.Read(offControl, b)
	if binary.LittleEndian.Uint16(b)&sciEnable == 0 {
		t.Fatalf("SCI_EN cleared by a guest write")
	}
}

func TestStatusAndState(t *testing.T) {
	p := New(nil, nil, slog.New(slog.DiscardHandler))
	p.SetWake()
	b := make([]byte, 2)
	p.Read(offStatus, b)
	if binary.LittleEndian.Uint16(b) != wakeStatus {
		t.Fatalf("status = %#x, want WAK_STS", b)
	}
	p.Write(offEnable, word(0x20))
	s := p.State()
	p.Write(offStatus, word(wakeStatus))
	p.Read(offStatus, b)
	if binary.LittleEndian.Uint16(b) != 0 {
		t.Errorf("status after write-one-to-clear = %#x, want 0", b)
	}
	if err := p.Restore(s); err != nil {
		t.Fatal(err)
	}
	if p.State() != s {
		t.Errorf("restored %+v, want %+v", p.State(), s)
	}
	if err := p.Restore(State{Version: 1}); err == nil {
		t.Error("restore accepted version 1")
	}
}
