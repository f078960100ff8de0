package dsm

import (
	"reflect"
	"strings"
	"testing"
)

func TestParsePlacement(t *testing.T) {
	tests := []struct {
		in   string
		want [][]int
		n    int
	}{
		{"0", [][]int{{0}}, 1},
		{"0-1/2,3", [][]int{{0, 1}, {2, 3}}, 4},
		{"0-1//2", [][]int{{0, 1}, {}, {2}}, 3},
		{"3/0-2", [][]int{{3}, {0, 1, 2}}, 4},
		{" 0 , 2 /1", [][]int{{0, 2}, {1}}, 3},
	}
	for _, tt := range tests {
		got, err := ParsePlacement(tt.in)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Fatalf("ParsePlacement(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
		n, err := CheckPlacement(got, len(tt.want))
		if err != nil || n != tt.n {
			t.Fatalf("CheckPlacement(%v) = %d, %v; want %d", got, n, err, tt.n)
		}
		again, err := ParsePlacement(FormatPlacement(got))
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Fatalf("FormatPlacement(%v) = %q does not parse back: %v %v", got, FormatPlacement(got), again, err)
		}
	}
	for in, want := range map[string]string{
		"":        "empty",
		"a":       "not a vCPU id",
		"-1":      "not a vCPU id",
		"2-1":     "not a range",
		"0,,1":    "empty list item",
		"0-99999": "too large",
	} {
		if _, err := ParsePlacement(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParsePlacement(%q) = %v, want an error containing %q", in, err, want)
		}
	}
	for _, tt := range []struct {
		p      [][]int
		slices int
		want   string
	}{
		{[][]int{{0}}, 2, "1 groups for 2 slices"},
		{[][]int{{0}, {0}}, 2, "vCPU 0 placed on slice 0 and slice 1"},
		{[][]int{{0}, {2}}, 2, "none is vCPU 1"},
		{[][]int{{}, {}}, 2, "no vCPU at all"},
	} {
		if _, err := CheckPlacement(tt.p, tt.slices); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("CheckPlacement(%v, %d) = %v, want an error containing %q", tt.p, tt.slices, err, tt.want)
		}
	}
}

// FuzzParsePlacement: the parser never panics, and an accepted valid
// placement formats and parses back to itself.
func FuzzParsePlacement(f *testing.F) {
	for _, s := range []string{"0", "0-1/2,3", "0-1//2", "1/0", "0-1023"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePlacement(s)
		if err != nil {
			return
		}
		if _, err := CheckPlacement(p, len(p)); err != nil {
			return
		}
		again, err := ParsePlacement(FormatPlacement(p))
		if err != nil || !reflect.DeepEqual(again, p) {
			t.Fatalf("%q -> %v -> %q -> %v, %v", s, p, FormatPlacement(p), again, err)
		}
	})
}
