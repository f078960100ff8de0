package policies

import (
	"fmt"
	"unicode"
	"unicode/utf8"
)

// A glob is an image name or matcher value in which '*' stands for any run
// of characters (including none, and including '/') and '?' for exactly one
// character. There are no character classes or escapes: image, user,
// account and partition names never contain '*' or '?'.
type glob string

func (g glob) literal() bool {
	for i := 0; i < len(g); i++ {
		if g[i] == '*' || g[i] == '?' {
			return false
		}
	}
	return true
}

// validGlob refuses empty patterns and ones with spaces or control
// characters, which are typos in every name hpcvm matches.
func validGlob(s string) error {
	if s == "" {
		return fmt.Errorf("empty pattern")
	}
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return fmt.Errorf("pattern %q contains a space or control character", s)
		}
	}
	return nil
}

// match reports whether name matches the pattern. It is the usual
// backtracking-on-last-star algorithm, linear in practice.
func (g glob) match(name string) bool {
	p := string(g)
	if g.literal() {
		return p == name
	}
	pi, ni := 0, 0
	star, starNi := -1, 0
	for ni < len(name) {
		switch {
		case pi < len(p) && p[pi] == '*':
			star, starNi = pi, ni
			pi++
		case pi < len(p) && (p[pi] == '?' || p[pi] == name[ni]):
			if p[pi] == '?' {
				// '?' is one character, not one byte.
				_, size := utf8.DecodeRuneInString(name[ni:])
				ni += size
			} else {
				ni++
			}
			pi++
		case star >= 0:
			pi = star + 1
			_, size := utf8.DecodeRuneInString(name[starNi:])
			starNi += size
			ni = starNi
		default:
			return false
		}
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}

// covers reports whether every name matched by p is also matched by g.
// It answers false when unsure, so callers only ever report a rule as dead
// when it certainly is.
func (g glob) covers(p glob) bool {
	return coversTok([]rune(string(g)), []rune(string(p)), map[[2]int]bool{}, 0, 0)
}

func coversTok(g, p []rune, memo map[[2]int]bool, gi, pi int) bool {
	key := [2]int{gi, pi}
	if v, ok := memo[key]; ok {
		return v
	}
	var r bool
	switch {
	case gi == len(g):
		r = pi == len(p)
	case g[gi] == '*':
		// The star absorbs nothing, or p's next token (whatever it is).
		r = coversTok(g, p, memo, gi+1, pi) || (pi < len(p) && coversTok(g, p, memo, gi, pi+1))
	case pi == len(p):
		r = false
	case g[gi] == '?':
		// '?' covers exactly one character: a literal or p's own '?', not a star.
		r = p[pi] != '*' && coversTok(g, p, memo, gi+1, pi+1)
	default:
		r = p[pi] == g[gi] && coversTok(g, p, memo, gi+1, pi+1)
	}
	memo[key] = r
	return r
}
