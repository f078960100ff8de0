package policies

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want Size
		err  string // fragment of the error; "" means success
	}{
		{"16GiB", 16 << 30, ""},
		{"512MiB", 512 << 20, ""},
		{"4G", 4 << 30, ""},
		{"4g", 4 << 30, ""},
		{"2Ti", 2 << 40, ""},
		{"1.5GiB", 3 << 29, ""},
		{" 64 GiB ", 64 << 30, ""},
		{"100B", 100, ""},
		{"1PiB", 1 << 50, ""},
		{"0", 0, ""},
		{"0.0", 0, ""},
		{"4096", 0, "unit is required"},
		{"1GB", 0, "ambiguous"},
		{"1kb", 0, "ambiguous"},
		{"0.1KiB", 0, "whole number of bytes"},
		{"1XB", 0, "unknown unit"},
		{"GiB", 0, "want a number"},
		{"", 0, "want a number"},
		{"-1G", 0, "want a number"},
		{"1..5G", 0, "malformed"},
		{"1.G", 0, "malformed"},
		{".5G", 0, "malformed"},
		{"8192PiB", 0, "too large"},
		{"1e3GiB", 0, "unknown unit"},
		{strings.Repeat("9", 50) + "B", 0, "too long"},
	}
	for _, tt := range tests {
		got, err := ParseSize(tt.in)
		switch {
		case tt.err == "" && (err != nil || got != tt.want):
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("ParseSize(%q) error = %v; want one mentioning %q", tt.in, err, tt.err)
		}
	}
}

func TestSizeString(t *testing.T) {
	for in, want := range map[Size]string{0: "0", 16 << 30: "16GiB", 1536 << 20: "1536MiB", 1000: "1000B", 1 << 50: "1PiB", 3 << 10: "3KiB"} {
		if got := in.String(); got != want {
			t.Errorf("Size(%d).String() = %q, want %q", in, got, want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		err  string
	}{
		{"30m", 30 * time.Minute, ""},
		{"1h30m", 90 * time.Minute, ""},
		{"1d12h", 36 * time.Hour, ""},
		{"45s", 45 * time.Second, ""},
		{"1h0m0s", time.Hour, ""},
		{"0", 0, ""},
		{"0s", 0, ""},
		{"600", 0, "want whole numbers"},
		{"1.5h", 0, "fractions are not allowed"},
		{"30m1h", 0, "out of order"},
		{"1m1m", 0, "out of order"},
		{"500ms", 0, "want whole numbers"},
		{"-5m", 0, "want whole numbers"},
		{"1w", 0, "unknown"},
		{"", 0, "empty"},
		{"off", 0, "want whole numbers"},
		{"99999999d", 0, "too large"},
		{"36500d99999999h", 0, "too large"},
		{"9999999999999s", 0, "too long"},
	}
	for _, tt := range tests {
		got, err := ParseDuration(tt.in)
		switch {
		case tt.err == "" && (err != nil || time.Duration(got) != tt.want):
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", tt.in, time.Duration(got), err, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("ParseDuration(%q) error = %v; want one mentioning %q", tt.in, err, tt.err)
		}
	}
}

func TestDurationString(t *testing.T) {
	for in, want := range map[time.Duration]string{0: "0", 90 * time.Minute: "1h30m", 36 * time.Hour: "1d12h", 45 * time.Second: "45s", 24*time.Hour + time.Second: "1d1s"} {
		if got := Duration(in).String(); got != want {
			t.Errorf("Duration(%v).String() = %q, want %q", in, got, want)
		}
	}
}

func TestWishJSON(t *testing.T) {
	tests := []struct {
		in   string
		want Wish
		ok   bool
	}{
		{`true`, WishYes, true}, {`false`, WishNo, true}, {`null`, WishUnset, true},
		{`"yes"`, WishYes, true}, {`"off"`, WishNo, true}, {`""`, WishUnset, true},
		{`"maybe"`, WishUnset, false}, {`1`, WishUnset, false},
	}
	for _, tt := range tests {
		var w Wish
		err := json.Unmarshal([]byte(tt.in), &w)
		if (err == nil) != tt.ok || w != tt.want {
			t.Errorf("Unmarshal(%s) = %v, %v; want %v ok=%v", tt.in, w, err, tt.want, tt.ok)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"16GiB", "1.5G", "0", "4096", "1GB", "0.1KiB", "8191PiB", " 2 mib"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("ParseSize(%q) = %d < 0", s, n)
		}
		back, err := ParseSize(n.String())
		if err != nil || back != n {
			t.Fatalf("ParseSize(%q) = %d; String %q reparses as %d, %v", s, n, n.String(), back, err)
		}
	})
}

func FuzzParseDuration(f *testing.F) {
	for _, s := range []string{"30m", "1d12h", "0", "600", "1h0m0s", "30m1h", "99999d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDuration(s)
		if err != nil {
			return
		}
		if d < 0 || time.Duration(d)%time.Second != 0 {
			t.Fatalf("ParseDuration(%q) = %v: negative or fractional", s, time.Duration(d))
		}
		back, err := ParseDuration(d.String())
		if err != nil || back != d {
			t.Fatalf("ParseDuration(%q) = %v; String %q reparses as %v, %v", s, time.Duration(d), d.String(), back, err)
		}
	})
}
