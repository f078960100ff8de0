package units

import (
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"512MiB", 512 << 20, true},
		{"16GiB", 16 << 30, true},
		{"4G", 4 << 30, true},
		{"1.5TiB", 3 << 39, true},
		{" 2 MiB ", 2 << 20, true},
		{"0", 0, true},
		{"4096B", 4096, true},
		{"1KB", 0, false},    // decimal units are ambiguous
		{"4096", 0, false},   // a bare number: bytes or Slurm's MiB?
		{"0.1KiB", 0, false}, // not a whole number of bytes
		{"", 0, false},
		{"-1G", 0, false},
		{"GiB", 0, false},
		{"20000000000TiB", 0, false},
		{"12XB", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseSize(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != tt.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[uint64]string{512 << 20: "512MiB", 16 << 30: "16GiB", 1000: "1000B", 0: "0", 1536 << 10: "1536KiB"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q want %q", n, got, want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"30m", 30 * time.Minute, true},
		{"1h30m", 90 * time.Minute, true},
		{"2d", 48 * time.Hour, true},
		{"0", 0, true},
		{"600", 0, false}, // seconds, or Slurm's minutes?
		{"30m1h", 0, false},
		{"1.5h", 0, false},
		{"-5m", 0, false},
		{"soon", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseDuration(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != tt.want) {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
	if got := FormatDuration(26*time.Hour + 30*time.Minute); got != "1d2h30m" {
		t.Errorf("FormatDuration = %q", got)
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"512MiB", "4G", "1.5TiB", "", "99999999999999999999TiB", "0.1KiB"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			return
		}
		// Whatever parses must round-trip through FormatSize.
		back, err := ParseSize(FormatSize(n))
		if err != nil || back != n {
			t.Fatalf("ParseSize(%q)=%d, FormatSize=%q reparsed as %d, %v", s, n, FormatSize(n), back, err)
		}
	})
}

func FuzzParseDuration(f *testing.F) {
	for _, s := range []string{"30m", "2d", "1h30m", "0", "1d12h"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDuration(s)
		if err != nil {
			return
		}
		if d < 0 {
			t.Fatalf("ParseDuration(%q) = negative %v", s, d)
		}
		back, err := ParseDuration(FormatDuration(d))
		if err != nil || back != d {
			t.Fatalf("ParseDuration(%q)=%v, FormatDuration=%q reparsed as %v, %v", s, d, FormatDuration(d), back, err)
		}
	})
}
