// Package units parses and formats the human units hpcvm accepts on the
// command line and in configuration files: byte sizes ("512MiB", "16GiB")
// and durations ("30m", "1h30m", "2d").
package units

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

var sizeSuffixes = []struct {
	suffix string
	mult   uint64
}{
	// Longest first so "GiB" is not read as "B" after "Gi".
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"TB", 1000 * 1000 * 1000 * 1000},
	// Slurm style: K, M, G, T are binary (as in --mem=4G).
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	{"B", 1},
}

// ParseSize parses a byte size: a non-negative integer followed by an
// optional unit. Units: B, KiB/MiB/GiB/TiB (binary), KB/MB/GB/TB (decimal),
// and Slurm's K/M/G/T (binary). A bare number is bytes.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("size %q: empty", s)
	}
	mult := uint64(1)
	num := t
	for _, u := range sizeSuffixes {
		if strings.HasSuffix(t, u.suffix) {
			mult = u.mult
			num = strings.TrimSpace(strings.TrimSuffix(t, u.suffix))
			break
		}
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: want a whole number with an optional unit (B, KiB, MiB, GiB, TiB, K, M, G, T, KB, MB, GB, TB)", s)
	}
	if n != 0 && mult > ^uint64(0)/n {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n * mult, nil
}

// FormatSize renders a byte count with the largest exact binary unit.
func FormatSize(n uint64) string {
	for _, u := range []struct {
		s string
		m uint64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n != 0 && n%u.m == 0 {
			return fmt.Sprintf("%d%s", n/u.m, u.s)
		}
	}
	return fmt.Sprintf("%dB", n)
}

// ParseDuration parses a Go duration ("90s", "1h30m") and also whole days
// ("2d") and plain seconds ("600").
func ParseDuration(s string) (time.Duration, error) {
	t := strings.TrimSpace(s)
	if n, err := strconv.ParseUint(t, 10, 32); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	if strings.HasSuffix(t, "d") {
		if n, err := strconv.ParseUint(strings.TrimSuffix(t, "d"), 10, 16); err == nil {
			return time.Duration(n) * 24 * time.Hour, nil
		}
	}
	d, err := time.ParseDuration(t)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("duration %q: want e.g. 90s, 30m, 1h30m, 2d or a number of seconds", s)
	}
	return d, nil
}
