// Package images defines, builds and stores hpcvm's OS images: a TOML
// definition per image, a builder (debootstrap into a raw ext4 disk plus the
// image's own kernel and initramfs) and an image store with atomic publish,
// verify, list and remove. See docs/images.md.
package images

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
	"github.com/hpcvm/hpcvm/internal/units"
)

// Definition is one image's TOML definition.
type Definition struct {
	Name        string   `toml:"name" json:"name"`
	Version     string   `toml:"version" json:"version"`
	Description string   `toml:"description" json:"description,omitempty"`
	Packages    []string `toml:"packages" json:"packages,omitempty"`
	DiskSize    Size     `toml:"disk_size" json:"disk_size"`
	Base        Base     `toml:"base" json:"base"`
	Kernel      Kernel   `toml:"kernel" json:"kernel"`
	Agent       Agent    `toml:"agent" json:"agent"`
	Files       []File   `toml:"files" json:"files,omitempty"`

	// Source is the file the definition was read from ("" if none); File
	// sources are relative to its directory. Not part of the hash.
	Source string `toml:"-" json:"-"`
}

// Base is the distribution the image is bootstrapped from.
type Base struct {
	Distribution string   `toml:"distribution" json:"distribution"` // only "debian" for now
	Suite        string   `toml:"suite" json:"suite"`               // e.g. "bookworm"
	Mirror       string   `toml:"mirror" json:"mirror,omitempty"`   // default http://deb.debian.org/debian
	Variant      string   `toml:"variant" json:"variant,omitempty"` // debootstrap variant, default minbase
	Components   []string `toml:"components" json:"components,omitempty"`
}

// Kernel is the image's own kernel package and command line.
type Kernel struct {
	Package string `toml:"package" json:"package"`
	Cmdline string `toml:"cmdline" json:"cmdline"`
}

// Agent configures the guest agent installed in the image.
type Agent struct {
	Port uint32 `toml:"port" json:"port"` // vsock port; default proto.DefaultPort
}

// File is an extra file put into the image.
type File struct {
	Path    string `toml:"path" json:"path"`
	Content string `toml:"content" json:"content,omitempty"`
	Source  string `toml:"source" json:"source,omitempty"` // host file, relative to the definition
	Mode    string `toml:"mode" json:"mode,omitempty"`     // octal, default "0644"
	UID     uint32 `toml:"uid" json:"uid,omitempty"`
	GID     uint32 `toml:"gid" json:"gid,omitempty"`
}

// Size is a byte size written as "2GiB" (internal/units).
type Size uint64

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(b []byte) error {
	n, err := units.ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (s Size) MarshalText() ([]byte, error) { return []byte(units.FormatSize(uint64(s))), nil }

// Defaults applied by Parse when a field is absent.
const (
	DefaultMirror  = "http://deb.debian.org/debian"
	DefaultVariant = "minbase"
	minDiskSize    = 256 << 20
)

var (
	nameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	packageRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)
	suiteRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]*$`)
	typeErrRE = regexp.MustCompile(`(?s)^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)
)

// ValidName reports whether s can name an image (a directory in the store).
func ValidName(s string) bool { return nameRE.MatchString(s) }

// ParseFile reads and validates a definition file.
func ParseFile(file string) (*Definition, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	d, err := Parse(file, b)
	if err != nil {
		return nil, err
	}
	d.Source = file
	return d, nil
}

// Parse decodes and validates a definition; file names it in errors, which
// read "file:line: ...".
func Parse(file string, data []byte) (*Definition, error) {
	var d Definition
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&d)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("%s:%d: %s", file, pe.Position.Line, pe.Message)
		}
		// Type errors come as "toml: line N (last key "k"): msg".
		if m := typeErrRE.FindStringSubmatch(err.Error()); m != nil {
			return nil, fmt.Errorf("%s:%s: %s: %s", file, m[1], m[2], m[3])
		}
		return nil, fmt.Errorf("%s: %v", file, strings.TrimPrefix(err.Error(), "toml: "))
	}
	if und := md.Undecoded(); len(und) > 0 {
		var msgs []string
		for _, k := range und {
			msgs = append(msgs, fmt.Sprintf("%s:%d: unknown key %q", file, keyLine(data, k), k.String()))
		}
		return nil, errors.New(strings.Join(msgs, "\n"))
	}
	d.applyDefaults()
	if err := d.validate(file, data); err != nil {
		return nil, err
	}
	return &d, nil
}

func (d *Definition) applyDefaults() {
	if d.Base.Mirror == "" {
		d.Base.Mirror = DefaultMirror
	}
	if d.Base.Variant == "" {
		d.Base.Variant = DefaultVariant
	}
	if len(d.Base.Components) == 0 {
		d.Base.Components = []string{"main"}
	}
	if d.Agent.Port == 0 {
		d.Agent.Port = proto.DefaultPort
	}
	for i := range d.Files {
		if d.Files[i].Mode == "" {
			d.Files[i].Mode = "0644"
		}
	}
}

func (d *Definition) validate(file string, data []byte) error {
	var errs []string
	bad := func(key toml.Key, format string, args ...any) {
		errs = append(errs, fmt.Sprintf("%s:%d: %s: %s", file, keyLine(data, key), key.String(), fmt.Sprintf(format, args...)))
	}
	if !ValidName(d.Name) {
		bad(toml.Key{"name"}, "%q must be 1-63 of a-z 0-9 . _ - starting with a letter or digit", d.Name)
	}
	if d.Version == "" {
		bad(toml.Key{"version"}, "required")
	}
	if d.Base.Distribution != "debian" {
		bad(toml.Key{"base", "distribution"}, "%q is not supported (supported: debian)", d.Base.Distribution)
	}
	if !suiteRE.MatchString(d.Base.Suite) {
		bad(toml.Key{"base", "suite"}, "%q is not a suite name (e.g. bookworm)", d.Base.Suite)
	}
	if !strings.HasPrefix(d.Base.Mirror, "http://") && !strings.HasPrefix(d.Base.Mirror, "https://") && !strings.HasPrefix(d.Base.Mirror, "file:/") {
		bad(toml.Key{"base", "mirror"}, "%q is not an http(s):// or file:/ URL", d.Base.Mirror)
	}
	switch d.Base.Variant {
	case "minbase", "buildd", "-":
	default:
		bad(toml.Key{"base", "variant"}, "%q is not a debootstrap variant (minbase, buildd, -)", d.Base.Variant)
	}
	for _, c := range d.Base.Components {
		if !suiteRE.MatchString(c) {
			bad(toml.Key{"base", "components"}, "%q is not a component name", c)
		}
	}
	for _, p := range d.Packages {
		if !packageRE.MatchString(p) {
			bad(toml.Key{"packages"}, "%q is not a Debian package name", p)
		}
	}
	if !packageRE.MatchString(d.Kernel.Package) {
		bad(toml.Key{"kernel", "package"}, "%q is not a Debian package name (e.g. linux-image-cloud-amd64)", d.Kernel.Package)
	}
	if !strings.Contains(" "+d.Kernel.Cmdline+" ", " root=") {
		bad(toml.Key{"kernel", "cmdline"}, "%q has no root= (e.g. root=/dev/vda rw console=ttyS0)", d.Kernel.Cmdline)
	}
	if strings.ContainsAny(d.Kernel.Cmdline, "\n\x00") {
		bad(toml.Key{"kernel", "cmdline"}, "contains a newline or NUL")
	}
	if d.DiskSize < minDiskSize {
		bad(toml.Key{"disk_size"}, "%s is below the minimum %s", units.FormatSize(uint64(d.DiskSize)), units.FormatSize(minDiskSize))
	}
	if d.Agent.Port > 1<<31 {
		bad(toml.Key{"agent", "port"}, "%d out of range", d.Agent.Port)
	}
	seen := map[string]bool{}
	for i, f := range d.Files {
		where := fmt.Sprintf("files[%d] ", i)
		bad := func(k string, format string, args ...any) {
			key := toml.Key{"files", k}
			errs = append(errs, fmt.Sprintf("%s:%d: %s: %s", file, keyLineN(data, key, i), key.String(), fmt.Sprintf(format, args...)))
		}
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || f.Path == "/" || strings.ContainsAny(f.Path, "\n\x00") {
			bad("path", "%s%q must be an absolute, clean file path", where, f.Path)
		}
		if seen[f.Path] {
			bad("path", "%s%q given twice", where, f.Path)
		}
		seen[f.Path] = true
		if f.Content != "" && f.Source != "" {
			bad("content", "%sgive content or source, not both (neither: an empty file)", where)
		}
		if f.Source != "" && filepath.IsAbs(f.Source) {
			bad("source", "%s%q must be relative to the definition file", where, f.Source)
		}
		if _, err := ParseMode(f.Mode); err != nil {
			bad("mode", "%s%v", where, err)
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "\n"))
	}
	return nil
}

// ParseMode parses an octal permission string such as "0755".
func ParseMode(s string) (os.FileMode, error) {
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n&^0o7777 != 0 {
		return 0, fmt.Errorf("mode %q is not an octal mode such as \"0644\"", s)
	}
	m := os.FileMode(n & 0o777)
	if n&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if n&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if n&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m, nil
}

// keyLine finds the line where key is set, for error messages. The TOML
// decoder does not expose key positions, so this follows table headers and
// (dotted) keys the way TOML assigns them; 0 means not found.
func keyLine(data []byte, key toml.Key) int { return keyLineN(data, key, -1) }

// keyLineN is keyLine for a key inside the nth (from 0) element of an array
// of tables such as [[files]]; nth < 0 matches any.
func keyLineN(data []byte, key toml.Key, nth int) int {
	want := key.String()
	table := ""
	elem := -1 // index of the current [[key[0]]] element
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	last := key[len(key)-1]
	fallback := 0
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		if strings.HasPrefix(line, "[") {
			h := strings.Trim(strings.SplitN(line, "#", 2)[0], " \t[]")
			table = normKey(h)
			if strings.HasPrefix(line, "[[") && table == key[0] {
				elem++
			}
			if table == want && (nth < 0 || elem == nth) {
				return n
			}
			continue
		}
		if nth >= 0 && elem != nth {
			continue
		}
		k, _, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		full := normKey(k)
		if table != "" {
			full = table + "." + full
		}
		if full == want {
			return n
		}
		if fallback == 0 && normKey(k) == last {
			fallback = n
		}
	}
	return fallback
}

// normKey turns `a . "b"` into a.b (quotes dropped; good enough for
// locating keys in errors).
func normKey(k string) string {
	parts := strings.Split(k, ".")
	for i, p := range parts {
		parts[i] = strings.Trim(strings.TrimSpace(p), `"'`)
	}
	return strings.Join(parts, ".")
}

// Hash is the definition's content hash: the canonical JSON of the
// definition plus the content of every file it pulls in. Builds are cached
// under it (together with the agent binary's hash, see Builder).
func (d *Definition) Hash() (string, error) {
	h := sha256.New()
	b, err := json.Marshal(d)
	if err != nil {
		return "", err
	}
	h.Write(b)
	for _, f := range d.Files {
		if f.Source == "" {
			continue
		}
		c, err := os.ReadFile(d.SourcePath(f))
		if err != nil {
			return "", fmt.Errorf("%s: files %s: %w", d.Source, f.Path, err)
		}
		fmt.Fprintf(h, "\x00%s\x00%d\x00", f.Path, len(c))
		h.Write(c)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// SourcePath resolves a File's source relative to the definition file.
func (d *Definition) SourcePath(f File) string {
	if d.Source == "" {
		return f.Source
	}
	return filepath.Join(filepath.Dir(d.Source), f.Source)
}
