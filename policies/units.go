package policies

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/hpcvm/hpcvm/internal/units"
)

// Size is a number of bytes. In policy files and requests it is written in
// human units, see ParseSize.
type Size int64

// ParseSize parses a byte size such as "16GiB", "512MiB", "1.5TiB" or "4G"
// (see internal/units.ParseSize: binary units only, a unit is required).
func ParseSize(s string) (Size, error) {
	n, err := units.ParseSize(s)
	return Size(n), err
}

// String renders the size with the largest binary unit that divides it
// exactly, so that ParseSize(s.String()) == s.
func (s Size) String() string {
	if s < 0 {
		return strconv.FormatInt(int64(s), 10) + "B"
	}
	return units.FormatSize(uint64(s))
}

// UnmarshalText accepts the forms ParseSize accepts.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// MarshalText writes the canonical form, e.g. "16GiB".
func (s Size) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Duration is a length of time in whole seconds, written as in ParseDuration.
type Duration time.Duration

// ParseDuration parses a duration such as "30m", "1h30m", "1d12h" or "45s"
// (see internal/units.ParseDuration).
func ParseDuration(s string) (Duration, error) {
	d, err := units.ParseDuration(s)
	return Duration(d), err
}

// String renders the duration as ParseDuration reads it, e.g. "1d2h30m".
// Sub-second remainders (impossible after parsing) are dropped.
func (d Duration) String() string { return units.FormatDuration(time.Duration(d)) }

// Seconds is the duration in whole seconds.
func (d Duration) Seconds() int64 { return int64(time.Duration(d) / time.Second) }

// UnmarshalText accepts the forms ParseDuration accepts.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// MarshalText writes the canonical form, e.g. "1h30m".
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// parseSwitchDuration is ParseDuration that also reads "off" (and "no") as 0,
// for settings such as checkpoint intervals where 0 means "none".
func parseSwitchDuration(s string) (Duration, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "off", "no", "none":
		return 0, nil
	}
	return ParseDuration(s)
}

// Wish is a user's optional yes/no preference: unset, yes or no.
type Wish int8

// Wish values.
const (
	WishUnset Wish = iota
	WishYes
	WishNo
)

// ParseWish reads "", "yes"/"no", "true"/"false", "on"/"off", "1"/"0".
func ParseWish(s string) (Wish, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "":
		return WishUnset, nil
	case "yes", "y", "true", "on", "1":
		return WishYes, nil
	case "no", "n", "false", "off", "0":
		return WishNo, nil
	}
	return WishUnset, fmt.Errorf("%q: want yes or no", s)
}

func (w Wish) String() string {
	switch w {
	case WishYes:
		return "yes"
	case WishNo:
		return "no"
	}
	return ""
}

// UnmarshalJSON accepts true, false, null and the strings ParseWish accepts.
func (w *Wish) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch x := v.(type) {
	case nil:
		*w = WishUnset
	case bool:
		*w = map[bool]Wish{true: WishYes, false: WishNo}[x]
	case string:
		p, err := ParseWish(x)
		if err != nil {
			return err
		}
		*w = p
	default:
		return fmt.Errorf("%s: want true, false, \"yes\" or \"no\"", b)
	}
	return nil
}

// MarshalJSON writes null, true or false.
func (w Wish) MarshalJSON() ([]byte, error) {
	switch w {
	case WishYes:
		return []byte("true"), nil
	case WishNo:
		return []byte("false"), nil
	}
	return []byte("null"), nil
}

// fitsInt reports whether an integer from TOML fits a Go int on every
// platform hpcvm builds for.
func fitsInt(v int64) bool { return v >= math.MinInt32 && v <= math.MaxInt32 }
