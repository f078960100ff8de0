package images

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const minimal = `name = "t1"
version = "1"
disk_size = "1GiB"
[base]
distribution = "debian"
suite = "bookworm"
[kernel]
package = "linux-image-cloud-amd64"
cmdline = "root=/dev/vda rw"
`

func TestShippedDefinitionsParse(t *testing.T) {
	for _, f := range []string{"debian12.toml", "../examples/images/debian12-mpi.toml"} {
		d, err := ParseFile(f)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if _, err := d.Hash(); err != nil {
			t.Fatalf("%s: hash: %v", f, err)
		}
	}
	d, _ := ParseFile("debian12.toml")
	if d.Name != "debian12" || d.Base.Suite != "bookworm" || d.DiskSize != 2<<30 || d.Agent.Port != 1024 {
		t.Fatalf("debian12.toml parsed as %+v", d)
	}
}

func TestParseDefaults(t *testing.T) {
	d, err := Parse("t.toml", []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if d.Base.Mirror != DefaultMirror || d.Base.Variant != "minbase" || len(d.Base.Components) != 1 || d.Agent.Port != 1024 {
		t.Fatalf("defaults not applied: %+v", d)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		toml string
		want string // substring of the error, including file:line
	}{
		{"unknown top-level key", "colour = 1\n" + minimal, `t.toml:1: unknown key "colour"`},
		{"unknown key after table is in the table", minimal + "colour = 1\n", `t.toml:10: unknown key "kernel.colour"`},
		{"unknown key in table", strings.Replace(minimal, "[kernel]\n", "[kernel]\ncmdlin = \"x\"\n", 1), `t.toml:8: unknown key "kernel.cmdlin"`},
		{"unknown key in files", minimal + "[[files]]\npath = \"/a\"\nowner = \"root\"\n", `t.toml:12: unknown key "files.owner"`},
		{"syntax error", "name = \n", "t.toml:1:"},
		{"wrong type", strings.Replace(minimal, `version = "1"`, `version = 1`, 1), "t.toml:2: version: incompatible types"},
		{"bad size", strings.Replace(minimal, `"1GiB"`, `"lots"`, 1), "t.toml:3"},
		{"too small", strings.Replace(minimal, `"1GiB"`, `"1MiB"`, 1), "t.toml:3: disk_size: 1MiB is below the minimum"},
		{"bad name", strings.Replace(minimal, `"t1"`, `"Bad Name"`, 1), "t.toml:1: name:"},
		{"no version", strings.Replace(minimal, "version = \"1\"\n", "", 1), "version: required"},
		{"unsupported distribution", strings.Replace(minimal, `"debian"`, `"fedora"`, 1), `t.toml:5: base.distribution: "fedora" is not supported`},
		{"no root in cmdline", strings.Replace(minimal, `"root=/dev/vda rw"`, `"console=ttyS0"`, 1), "t.toml:9: kernel.cmdline"},
		{"bad package", strings.Replace(minimal, "disk_size", "packages = [\"ok\", \"Not OK\"]\ndisk_size", 1), `t.toml:3: packages: "Not OK"`},
		{"relative file path", minimal + "[[files]]\npath = \"etc/x\"\n", "t.toml:11: files.path"},
		{"duplicate file", minimal + "[[files]]\npath = \"/x\"\n[[files]]\npath = \"/x\"\n", "t.toml:13: files.path: files[1] \"/x\" given twice"},
		{"second file's mode", minimal + "[[files]]\npath = \"/x\"\nmode = \"0644\"\n[[files]]\npath = \"/y\"\nmode = \"bad\"\n", "t.toml:15: files.mode: files[1]"},
		{"content and source", minimal + "[[files]]\npath = \"/x\"\ncontent = \"a\"\nsource = \"b\"\n", "t.toml:12: files.content"},
		{"absolute source", minimal + "[[files]]\npath = \"/x\"\nsource = \"/etc/passwd\"\n", "must be relative"},
		{"bad mode", minimal + "[[files]]\npath = \"/x\"\nmode = \"0999\"\n", "t.toml:12: files.mode"},
		{"bad variant", strings.Replace(minimal, "[base]\n", "[base]\nvariant = \"fat\"\n", 1), "t.toml:5: base.variant"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("t.toml", []byte(tc.toml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestHash(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "hello.sh")
	if err := os.WriteFile(src, []byte("echo 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	def := filepath.Join(dir, "d.toml")
	text := minimal + "[[files]]\npath = \"/usr/local/bin/hello\"\nsource = \"hello.sh\"\nmode = \"0755\"\n"
	if err := os.WriteFile(def, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	hash := func() string {
		d, err := ParseFile(def)
		if err != nil {
			t.Fatal(err)
		}
		h, err := d.Hash()
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	h1 := hash()
	if h2 := hash(); h1 != h2 {
		t.Fatalf("hash not stable: %s %s", h1, h2)
	}
	// A comment changes nothing; a source file's content does.
	os.WriteFile(def, []byte("# comment\n"+text), 0o644)
	if h := hash(); h != h1 {
		t.Fatalf("a comment changed the hash")
	}
	os.WriteFile(src, []byte("echo 2\n"), 0o644)
	if h := hash(); h == h1 {
		t.Fatalf("changing a source file kept the hash")
	}
}

func TestParseMode(t *testing.T) {
	tests := []struct {
		in   string
		want os.FileMode
		ok   bool
	}{
		{"0644", 0o644, true}, {"755", 0o755, true}, {"4755", 0o755 | os.ModeSetuid, true},
		{"0999", 0, false}, {"", 0, false}, {"17777", 0, false}, {"rwx", 0, false},
	}
	for _, tc := range tests {
		got, err := ParseMode(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseMode(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// FuzzParse: arbitrary definition text must never panic, and an accepted
// definition must be valid by the same rules when parsed again.
func FuzzParse(f *testing.F) {
	f.Add(minimal)
	if b, err := os.ReadFile("debian12.toml"); err == nil {
		f.Add(string(b))
	}
	if b, err := os.ReadFile("../examples/images/debian12-mpi.toml"); err == nil {
		f.Add(string(b))
	}
	f.Add("[a]\nb.c = 1\n[[files]]\npath='/x'\n")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Parse("f.toml", []byte(s))
		if err != nil {
			if !strings.HasPrefix(err.Error(), "f.toml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if !ValidName(d.Name) || d.DiskSize < minDiskSize || d.Base.Mirror == "" {
			t.Fatalf("accepted an invalid definition: %+v", d)
		}
	})
}
