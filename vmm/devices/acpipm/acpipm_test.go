package acpipm

import (
	"log/slog"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/layout"
)

func TestWrites(t *testing.T) {
	s5 := byte(layout.ACPIS5SleepType<<2 | slpEn)
	tests := []struct {
		name              string
		off               uint64
		data              []byte
		poweroffs, resets int
	}{
		{"S5 with SLP_EN", offControl, []byte{s5}, 1, 0},
		{"S5 as a word write", offControl, []byte{s5, 0}, 1, 0},
		{"S5 without SLP_EN", offControl, []byte{layout.ACPIS5SleepType << 2}, 0, 0},
		{"S3 with SLP_EN", offControl, []byte{3<<2 | slpEn}, 0, 0},
		{"reset value", offReset, []byte{layout.ACPIResetValue}, 0, 1},
		{"other reset value", offReset, []byte{0x06}, 0, 0},
		{"status write", offStatus, []byte{0xff}, 0, 0},
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

func TestStatusAndState(t *testing.T) {
	p := New(nil, nil, slog.New(slog.DiscardHandler))
	p.SetWake()
	b := []byte{0}
	p.Read(offStatus, b)
	if b[0] != wakStatus {
		t.Fatalf("status = %#x, want WAK_STS", b[0])
	}
	s := p.State()
	p.Write(offStatus, []byte{wakStatus})
	p.Read(offStatus, b)
	if b[0] != 0 {
		t.Errorf("status after write-one-to-clear = %#x, want 0", b[0])
	}
	if err := p.Restore(s); err != nil {
		t.Fatal(err)
	}
	if p.State() != s {
		t.Errorf("restored %+v, want %+v", p.State(), s)
	}
	if err := p.Restore(State{Version: 2}); err == nil {
		t.Error("restore accepted version 2")
	}
}
