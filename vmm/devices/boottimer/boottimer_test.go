package boottimer

import (
	"log/slog"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/layout"
)

func TestMagicWrite(t *testing.T) {
	tests := []struct {
		name   string
		writes [][]byte
		fired  bool
	}{
		{"byte magic", [][]byte{{layout.BootTimerMagic}}, true},
		{"dword magic", [][]byte{{layout.BootTimerMagic, 0, 0, 0}}, true},
		{"other value", [][]byte{{1}, {layout.BootTimerMagic + 1, 0}}, false},
		{"twice", [][]byte{{layout.BootTimerMagic}, {layout.BootTimerMagic}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now().Add(-time.Second)
			calls := 0
			var got time.Duration
			tm := New(start, func(d time.Duration) { calls++; got = d }, slog.New(slog.DiscardHandler))
			for _, w := range tt.writes {
				tm.Write(0, w)
			}
			d, done := tm.Elapsed()
			if done != tt.fired {
				t.Fatalf("done = %v, want %v", done, tt.fired)
			}
			wantCalls := 0
			if tt.fired {
				wantCalls = 1
				// start was a second ago, so the elapsed time includes it.
				if d < time.Second || got != d {
					t.Errorf("elapsed %v, callback %v; want equal and at least 1s", d, got)
				}
			}
			if calls != wantCalls {
				t.Errorf("callback ran %d times, want %d", calls, wantCalls)
			}
		})
	}
}

func TestState(t *testing.T) {
	tm := New(time.Now(), nil, slog.New(slog.DiscardHandler))
	tm.Write(0, []byte{layout.BootTimerMagic})
	s := tm.State()
	tm2 := New(time.Now(), nil, slog.New(slog.DiscardHandler))
	if err := tm2.Restore(s); err != nil {
		t.Fatal(err)
	}
	if tm2.State() != s {
		t.Errorf("restored %+v, want %+v", tm2.State(), s)
	}
	if err := tm2.Restore(State{Version: 9}); err == nil {
		t.Error("restore accepted version 9")
	}
}
