package policies

import "testing"

func TestGlobMatch(t *testing.T) {
	tests := []struct {
		pat, name string
		want      bool
	}{
		{"rocky9", "rocky9", true},
		{"rocky9", "rocky", false},
		{"rocky*", "rocky9-cuda", true},
		{"rocky*", "rocky", true},
		{"*", "", true},
		{"site/*", "site/a/b", true},
		{"*-debug", "rocky-debug", true},
		{"*-debug", "rocky-debugx", false},
		{"r?cky", "rocky", true},
		{"r?cky", "rcky", false},
		{"?", "é", true},
		{"a*b*c", "aXbYbZc", true},
		{"a*b*c", "aXbYbZ", false},
		{"**x", "x", true},
	}
	for _, tt := range tests {
		if got := glob(tt.pat).match(tt.name); got != tt.want {
			t.Errorf("glob(%q).match(%q) = %v, want %v", tt.pat, tt.name, got, tt.want)
		}
	}
}

func TestGlobCovers(t *testing.T) {
	tests := []struct {
		g, p string
		want bool
	}{
		{"*", "anything*", true},
		{"rocky*", "rocky9-*", true},
		{"rocky*", "rocky", true},
		{"rocky9-*", "rocky*", false},
		{"rocky?", "rocky*", false},
		{"rocky?", "rocky9", true},
		{"rocky?", "rocky?", true},
		{"*-debug", "rocky*-debug", true},
		{"*a*", "b*a", true},
		{"a", "b", false},
		{"a*", "*a", false},
	}
	for _, tt := range tests {
		if got := glob(tt.g).covers(glob(tt.p)); got != tt.want {
			t.Errorf("glob(%q).covers(%q) = %v, want %v", tt.g, tt.p, got, tt.want)
		}
	}
}

// FuzzGlobCovers checks that covers never claims more than is true: if g
// covers p, every name p matches must match g. The names tried are p with
// its wildcards replaced by a few fillers.
func FuzzGlobCovers(f *testing.F) {
	f.Add("rocky*", "rocky9-*", "")
	f.Add("*a*", "b*a", "xyz")
	f.Add("?b", "*b", "q")
	f.Fuzz(func(t *testing.T, g, p, fill string) {
		if len(g) > 40 || len(p) > 40 || len(fill) > 8 || !glob(g).covers(glob(p)) {
			return
		}
		for _, f := range []string{"", "x", fill, fill + fill} {
			name := []rune{}
			for _, r := range p {
				switch r {
				case '*':
					name = append(name, []rune(f)...)
				case '?':
					name = append(name, 'z')
				default:
					name = append(name, r)
				}
			}
			if glob(p).match(string(name)) && !glob(g).match(string(name)) {
				t.Fatalf("covers(%q, %q) but %q matches only the second", g, p, string(name))
			}
		}
	})
}
