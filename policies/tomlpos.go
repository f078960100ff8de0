package policies

import (
	"strconv"
	"strings"
)

// keyLines maps each key of a TOML document to the line it is defined on.
// The TOML library does not expose key positions, and every problem report
// must name a line, so this scanner walks the (already validated) document
// once. Paths are the key's segments joined by '.', with the element index
// after each array of tables: "rule.3.limits.max_nodes". It never fails:
// on input it does not understand it just records fewer keys.
func keyLines(src string) map[string]int {
	s := &posScanner{src: src, line: 1, lines: map[string]int{}, aot: map[string]int{}}
	s.document()
	return s.lines
}

type posScanner struct {
	src   string
	i     int
	line  int
	lines map[string]int
	aot   map[string]int // array-of-tables path -> index of its last element
	table string         // resolved path of the current [table]
}

func (s *posScanner) peek() byte {
	if s.i < len(s.src) {
		return s.src[s.i]
	}
	return 0
}

func (s *posScanner) adv() {
	if s.i < len(s.src) {
		if s.src[s.i] == '\n' {
			s.line++
		}
		s.i++
	}
}

// skipSpace skips blanks, and also newlines and comments when nl is set.
func (s *posScanner) skipSpace(nl bool) {
	for s.i < len(s.src) {
		switch c := s.src[s.i]; {
		case c == ' ' || c == '\t' || c == '\r':
			s.adv()
		case nl && c == '\n':
			s.adv()
		case nl && c == '#':
			for s.i < len(s.src) && s.src[s.i] != '\n' {
				s.adv()
			}
		default:
			return
		}
	}
}

func (s *posScanner) document() {
	for {
		s.skipSpace(true)
		if s.i >= len(s.src) {
			return
		}
		start := s.i
		if s.peek() == '[' {
			s.header()
		} else {
			s.keyValue(s.table)
		}
		if s.i == start { // not understood: skip a line rather than loop
			for s.i < len(s.src) && s.src[s.i] != '\n' {
				s.adv()
			}
		}
	}
}

// resolve turns header segments into a path, inserting the current element
// index after every array of tables on the way.
func (s *posScanner) resolve(segs []string) string {
	p := ""
	for _, seg := range segs {
		p = join(p, seg)
		if n, ok := s.aot[p]; ok {
			p += "." + strconv.Itoa(n)
		}
	}
	return p
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

func (s *posScanner) header() {
	line := s.line
	s.adv()
	array := s.peek() == '['
	if array {
		s.adv()
	}
	segs := s.key()
	s.skipSpace(false)
	for s.peek() == ']' {
		s.adv()
	}
	if len(segs) == 0 {
		return
	}
	if array {
		parent := s.resolve(segs[:len(segs)-1])
		p := join(parent, segs[len(segs)-1])
		n, ok := s.aot[p]
		if !ok {
			n = -1
		}
		s.aot[p] = n + 1
		s.lines[p] = line
		s.table = p + "." + strconv.Itoa(n+1)
		s.lines[s.table] = line
		return
	}
	s.table = s.resolve(segs)
	if _, ok := s.lines[s.table]; !ok {
		s.lines[s.table] = line
	}
}

// key reads a possibly dotted key; segments may be bare or quoted.
func (s *posScanner) key() []string {
	var segs []string
	for {
		s.skipSpace(false)
		var seg string
		switch s.peek() {
		case '"':
			seg = s.quoted('"')
		case '\'':
			seg = s.quoted('\'')
		default:
			start := s.i
			for s.i < len(s.src) && isBare(s.src[s.i]) {
				s.adv()
			}
			if s.i == start {
				return segs
			}
			seg = s.src[start:s.i]
		}
		segs = append(segs, seg)
		s.skipSpace(false)
		if s.peek() != '.' {
			return segs
		}
		s.adv()
	}
}

func isBare(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// quoted reads a single-line string; escapes are kept undecoded, which is
// enough to find where the string ends.
func (s *posScanner) quoted(q byte) string {
	s.adv()
	start := s.i
	for s.i < len(s.src) && s.src[s.i] != q && s.src[s.i] != '\n' {
		if q == '"' && s.src[s.i] == '\\' {
			s.adv()
		}
		s.adv()
	}
	v := s.src[start:min(s.i, len(s.src))]
	s.adv()
	if q == '"' && strings.Contains(v, `\`) {
		if u, err := strconv.Unquote(`"` + v + `"`); err == nil {
			v = u
		}
	}
	return v
}

func (s *posScanner) keyValue(prefix string) {
	line := s.line
	segs := s.key()
	if len(segs) == 0 {
		return
	}
	p := prefix
	for _, seg := range segs {
		p = join(p, seg)
		if _, ok := s.lines[p]; !ok {
			s.lines[p] = line
		}
	}
	s.lines[p] = line
	s.skipSpace(false)
	if s.peek() != '=' {
		return
	}
	s.adv()
	s.skipSpace(false)
	s.value(p)
}

func (s *posScanner) value(path string) {
	switch c := s.peek(); c {
	case '"', '\'':
		if strings.HasPrefix(s.src[s.i:], string([]byte{c, c, c})) {
			s.multiline(c)
		} else {
			s.quoted(c)
		}
	case '[':
		s.adv()
		for {
			s.skipSpace(true)
			switch s.peek() {
			case ']':
				s.adv()
				return
			case ',':
				s.adv()
				continue
			case 0:
				return
			}
			start := s.i
			s.value(path)
			if s.i == start {
				s.adv()
			}
		}
	case '{':
		s.adv()
		for {
			s.skipSpace(false)
			switch s.peek() {
			case '}':
				s.adv()
				return
			case ',':
				s.adv()
				continue
			case 0, '\n':
				return
			}
			start := s.i
			s.keyValue(path)
			if s.i == start {
				s.adv()
			}
		}
	default:
		for s.i < len(s.src) && !strings.ContainsRune(",]}#\n", rune(s.src[s.i])) {
			s.adv()
		}
	}
}

func (s *posScanner) multiline(q byte) {
	for range 3 {
		s.adv()
	}
	for s.i < len(s.src) {
		if q == '"' && s.src[s.i] == '\\' {
			s.adv()
			s.adv()
			continue
		}
		if s.src[s.i] == q && strings.HasPrefix(s.src[s.i:], string([]byte{q, q, q})) {
			// A closing run may hold up to two extra quotes: """a"""" is a".
			for s.i < len(s.src) && s.src[s.i] == q {
				s.adv()
			}
			return
		}
		s.adv()
	}
}
