// Package units parses and formats the human units hpcvm accepts on the
// command line, in policies and in image definitions: byte sizes ("512MiB",
// "16GiB", Slurm's "4G") and durations ("30m", "1h30m", "2d"). One parser
// for the whole project, so a size or duration means the same everywhere.
package units

import (
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"time"
)

// Binary units only: a policy that says "1G" must not mean 10^9 on one node
// and 2^30 on another, so the decimal spellings (KB, MB, GB...) are refused.
var sizeUnits = map[string]int64{
	"b": 1,
	"k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40,
	"p": 1 << 50, "pi": 1 << 50, "pib": 1 << 50,
}

// maxNumberLen bounds the digits ParseSize reads, so garbage input cannot make
// it do big arithmetic.
const maxNumberLen = 40

// ParseSize parses a byte size such as "16GiB", "512MiB", "1.5TiB" or "4G".
//
// The number may have a decimal fraction as long as the result is a whole
// number of bytes. Units are binary and case-insensitive: B, KiB, MiB, GiB,
// TiB, PiB, also written Ki/K, Mi/M, Gi/G, Ti/T, Pi/P (Slurm's --mem=4G means
// 4GiB too). The decimal spellings KB, MB, GB, TB, PB are refused as
// ambiguous, and so is a bare number other than 0, which Slurm would read as
// MiB and most other tools as bytes.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	num, unit := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	if num == "" {
		return 0, fmt.Errorf("size %q: want a number and a unit, e.g. 16GiB or 512MiB", s)
	}
	if len(num) > maxNumberLen {
		return 0, fmt.Errorf("size %q: number too long", s)
	}
	intPart, frac, hasDot := strings.Cut(num, ".")
	if intPart == "" || (hasDot && frac == "") || strings.Contains(frac, ".") {
		return 0, fmt.Errorf("size %q: malformed number %q", s, num)
	}
	if unit == "" {
		if strings.Trim(num, "0.") == "" {
			return 0, nil
		}
		return 0, fmt.Errorf("size %q: a unit is required (B, KiB, MiB, GiB, TiB, PiB; K, M, G, T, P mean the same)", s)
	}
	mult, ok := sizeUnits[unit]
	if !ok {
		switch unit {
		case "kb", "mb", "gb", "tb", "pb":
			return 0, fmt.Errorf("size %q: %q is ambiguous (10^n or 2^n bytes?); write %siB", s, t[i:], strings.ToUpper(unit[:1]))
		}
		return 0, fmt.Errorf("size %q: unknown unit %q (want B, KiB, MiB, GiB, TiB or PiB)", s, t[i:])
	}
	// Exact rational arithmetic: "1.5GiB" is fine, "0.1KiB" is not a whole
	// number of bytes and is refused rather than rounded.
	r, ok := new(big.Rat).SetString(num)
	if !ok {
		return 0, fmt.Errorf("size %q: malformed number %q", s, num)
	}
	r.Mul(r, new(big.Rat).SetInt64(mult))
	if !r.IsInt() {
		return 0, fmt.Errorf("size %q: not a whole number of bytes", s)
	}
	n := r.Num()
	if !n.IsInt64() {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return uint64(n.Int64()), nil
}

// FormatSize renders a byte count with the largest binary unit that divides
// it exactly, so that ParseSize(FormatSize(n)) == n.
func FormatSize(n uint64) string {
	if n == 0 {
		return "0"
	}
	for _, u := range []struct {
		name string
		mult uint64
	}{{"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n%u.mult == 0 {
			return strconv.FormatUint(n/u.mult, 10) + u.name
		}
	}
	return strconv.FormatUint(n, 10) + "B"
}

// maxDuration keeps sums of durations far from overflow.
const maxDuration = 100 * 365 * 24 * time.Hour

var durationUnits = []struct {
	name byte
	d    time.Duration
}{{'d', 24 * time.Hour}, {'h', time.Hour}, {'m', time.Minute}, {'s', time.Second}}

// ParseDuration parses a duration such as "30m", "1h30m", "1d12h" or "45s".
//
// It is Go's duration syntax restricted to whole numbers of the units d (24
// hours), h, m and s, each at most once and largest first, plus "0". Bare
// numbers ("600": seconds or Slurm's minutes?), fractions, negative values and
// sub-second units are refused.
func ParseDuration(s string) (time.Duration, error) {
	t := strings.TrimSpace(s)
	if t == "0" {
		return 0, nil
	}
	if t == "" {
		return 0, fmt.Errorf("duration %q: empty; want e.g. 30m, 1h30m or 1d", s)
	}
	var total time.Duration
	next := 0 // index into durationUnits: units must come largest first
	for len(t) > 0 {
		i := 0
		for i < len(t) && t[i] >= '0' && t[i] <= '9' {
			i++
		}
		if i == 0 || i == len(t) {
			return 0, fmt.Errorf("duration %q: want whole numbers each followed by d, h, m or s, e.g. 1h30m", s)
		}
		if i > 12 {
			return 0, fmt.Errorf("duration %q: too long", s)
		}
		n, err := strconv.ParseInt(t[:i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("duration %q: %w", s, err)
		}
		if t[i] == '.' {
			return 0, fmt.Errorf("duration %q: fractions are not allowed; write e.g. 1h30m for 1.5h", s)
		}
		u := -1
		for j := next; j < len(durationUnits); j++ {
			if durationUnits[j].name == t[i] {
				u = j
				break
			}
		}
		if u < 0 {
			return 0, fmt.Errorf("duration %q: unit %q unknown or out of order (use d, h, m, s, largest first)", s, t[i:i+1])
		}
		if time.Duration(n) > maxDuration/durationUnits[u].d {
			return 0, fmt.Errorf("duration %q: too large", s)
		}
		total += time.Duration(n) * durationUnits[u].d
		if total > maxDuration {
			return 0, fmt.Errorf("duration %q: too large", s)
		}
		next = u + 1
		t = t[i+1:]
	}
	return total, nil
}

// FormatDuration renders d as ParseDuration reads it, e.g. "1d2h30m".
// Sub-second remainders are dropped.
func FormatDuration(d time.Duration) string {
	if d < time.Second {
		return "0"
	}
	var b strings.Builder
	rest := d
	for _, u := range durationUnits {
		if n := rest / u.d; n > 0 {
			b.WriteString(strconv.FormatInt(int64(n), 10))
			b.WriteByte(u.name)
			rest -= n * u.d
		}
	}
	return b.String()
}
