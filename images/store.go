package images

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Artifact names inside an image directory.
const (
	DiskFile     = "disk.raw"
	KernelFile   = "vmlinuz"
	InitrdFile   = "initrd.img"
	ManifestFile = "manifest.json"
	BuildLogFile = "build.log"
)

// ManifestSchema is the manifest format version.
const ManifestSchema = 1

// DefaultStoreDir is the store used when neither a flag nor
// HPCVM_IMAGE_STORE says otherwise.
const DefaultStoreDir = "/var/lib/hpcvm/images"

// Errors, checked with errors.Is.
var (
	ErrNotFound = errors.New("image not found")
	ErrBusy     = errors.New("image is being built by another process")
	ErrCorrupt  = errors.New("image does not match its manifest")
)

// Manifest describes a published image; it is the last file written.
type Manifest struct {
	Schema         int        `json:"schema"`
	Name           string     `json:"name"`
	Version        string     `json:"version"`
	Description    string     `json:"description,omitempty"`
	DefinitionHash string     `json:"definition_hash"`
	BuildKey       string     `json:"build_key"` // definition hash + agent binary: the cache key
	Created        time.Time  `json:"created"`
	Cmdline        string     `json:"cmdline"`
	Base           string     `json:"base,omitempty"` // e.g. "debian bookworm"
	KernelPackage  string     `json:"kernel_package,omitempty"`
	KernelVersion  string     `json:"kernel_version,omitempty"`
	AgentPort      uint32     `json:"agent_port"`
	AgentSHA256    string     `json:"agent_sha256,omitempty"`
	BuildSeconds   float64    `json:"build_seconds,omitempty"`
	Artifacts      []Artifact `json:"artifacts"`
}

// Artifact is one file of an image with its checksum.
type Artifact struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`             // apparent size in bytes
	Blocks int64  `json:"blocks,omitempty"` // bytes allocated on the host (sparse disks)
	SHA256 string `json:"sha256"`
}

// Artifact returns the named artifact.
func (m *Manifest) Artifact(name string) (Artifact, bool) {
	for _, a := range m.Artifacts {
		if a.Name == name {
			return a, true
		}
	}
	return Artifact{}, false
}

// Store is a directory of images: <dir>/<name>/{disk.raw,vmlinuz,
// initrd.img,manifest.json}. Builds happen in <dir>/.tmp-<name>-<random>
// and are renamed into place, so a name only ever holds a complete image.
type Store struct {
	Dir string
}

// OpenStore opens (creating if needed) the store at dir.
func OpenStore(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	return &Store{Dir: abs}, nil
}

// Path is the path of an image's file (or its directory for file "").
func (s *Store) Path(name, file string) string {
	return filepath.Join(s.Dir, name, file)
}

func checkName(name string) error {
	if !ValidName(name) {
		return fmt.Errorf("%q is not a valid image name", name)
	}
	return nil
}

// Get reads an image's manifest.
func (s *Store) Get(name string) (*Manifest, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(s.Path(name, ManifestFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s in %s: %w", name, s.Dir, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", s.Path(name, ManifestFile), err)
	}
	if m.Schema != ManifestSchema {
		return nil, fmt.Errorf("%s: manifest schema %d, this hpcvm reads %d", s.Path(name, ManifestFile), m.Schema, ManifestSchema)
	}
	return &m, nil
}

// List returns the manifests of all images, sorted by name. Entries that
// are not images (temporary build directories, locks) are skipped.
func (s *Store) List() ([]*Manifest, error) {
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil, err
	}
	var out []*Manifest
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") || !ValidName(e.Name()) {
			continue
		}
		m, err := s.Get(e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// VerifyResult is one artifact's verification.
type VerifyResult struct {
	Artifact Artifact
	Got      string // sha256 found, "" if unreadable
	Err      error
}

// OK reports whether the artifact matched.
func (r VerifyResult) OK() bool { return r.Err == nil && r.Got == r.Artifact.SHA256 }

// Verify recomputes every artifact's sha256. The error wraps ErrCorrupt if
// any artifact differs from the manifest.
func (s *Store) Verify(ctx context.Context, name string) ([]VerifyResult, error) {
	m, err := s.Get(name)
	if err != nil {
		return nil, err
	}
	var res []VerifyResult
	bad := 0
	for _, a := range m.Artifacts {
		sum, size, err := fileSHA256(ctx, s.Path(name, a.Name))
		r := VerifyResult{Artifact: a, Got: sum, Err: err}
		if err == nil && size != a.Size {
			r.Err = fmt.Errorf("size %d, manifest says %d", size, a.Size)
		}
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		if !r.OK() {
			bad++
		}
		res = append(res, r)
	}
	if bad > 0 {
		return res, fmt.Errorf("%s: %d of %d artifacts: %w", name, bad, len(res), ErrCorrupt)
	}
	return res, nil
}

func fileSHA256(ctx context.Context, path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, ctxReader{ctx, f})
	if err != nil {
		return "", n, fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// Remove deletes an image. It first renames the directory away, so the
// name disappears atomically even if the deletion is interrupted.
func (s *Store) Remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	unlock, err := s.lock(name)
	if err != nil {
		return err
	}
	defer unlock()
	dir := s.Path(name, "")
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s in %s: %w", name, s.Dir, ErrNotFound)
	}
	trash := filepath.Join(s.Dir, ".old-"+name+"-"+randomSuffix())
	if err := os.Rename(dir, trash); err != nil {
		return err
	}
	syncDir(s.Dir)
	return safeRemoveAll(trash)
}

// lock takes the per-name lock (flock on <store>/.<name>.lock), held for
// a whole build or removal. It is released if the process dies.
func (s *Store) lock(name string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(s.Dir, "."+name+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", name, ErrBusy)
		}
		return nil, err
	}
	return func() { f.Close() }, nil
}

// Staging is an image being built: a temporary directory in the store that
// Commit publishes under the image's name.
type Staging struct {
	store  *Store
	name   string
	dir    string
	unlock func()
	done   bool
}

// Begin starts staging a new image: it takes the name's lock, removes
// leftovers of interrupted builds of that name and creates the temporary
// directory.
func (s *Store) Begin(name string) (*Staging, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	unlock, err := s.lock(name)
	if err != nil {
		return nil, err
	}
	if err := s.cleanLeftovers(name); err != nil {
		unlock()
		return nil, err
	}
	dir := filepath.Join(s.Dir, ".tmp-"+name+"-"+randomSuffix())
	if err := os.Mkdir(dir, 0o755); err != nil {
		unlock()
		return nil, err
	}
	return &Staging{store: s, name: name, dir: dir, unlock: unlock}, nil
}

// cleanLeftovers removes .tmp-<name>-* and .old-<name>-* directories left
// by killed builds or removals; the caller holds the name's lock, so none
// of them belongs to a running build.
func (s *Store) cleanLeftovers(name string) error {
	for _, pat := range []string{".tmp-" + name + "-*", ".old-" + name + "-*"} {
		ms, err := filepath.Glob(filepath.Join(s.Dir, pat))
		if err != nil {
			return err
		}
		for _, m := range ms {
			// The random suffix has no dashes, so ".tmp-a-b-<r>" belongs
			// to image "a-b", never to image "a".
			if strings.Contains(strings.TrimPrefix(filepath.Base(m), pat[:5]+name+"-"), "-") {
				continue
			}
			if err := safeRemoveAll(m); err != nil {
				return fmt.Errorf("removing leftover %s: %w", m, err)
			}
		}
	}
	return nil
}

// Dir is the staging directory: artifacts go directly into it.
func (st *Staging) Dir() string { return st.dir }

// Abort removes the staging directory and releases the lock.
func (st *Staging) Abort() error {
	if st.done {
		return nil
	}
	st.done = true
	defer st.unlock()
	return safeRemoveAll(st.dir)
}

// Commit checksums the artifacts, writes the manifest, fsyncs everything
// and publishes the image under its name atomically. m.Artifacts is filled
// from the files named in artifacts.
//
// Replacing an existing image uses renameat2(RENAME_EXCHANGE): the name
// points to the old or the new directory at every instant. On filesystems
// without it, the old directory is renamed away and the new one in; a
// crash between the two renames leaves the name missing and the old image
// in .old-<name>-*, which the next Begin/Remove of that name deletes.
func (st *Staging) Commit(ctx context.Context, m *Manifest, artifacts ...string) error {
	if st.done {
		return errors.New("staging already committed or aborted")
	}
	m.Schema = ManifestSchema
	m.Name = st.name
	m.Artifacts = nil
	for _, a := range artifacts {
		p := filepath.Join(st.dir, a)
		sum, size, err := fileSHA256(ctx, p)
		if err != nil {
			return err
		}
		var blocks int64
		if fi, err := os.Stat(p); err == nil {
			if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
				blocks = sys.Blocks * 512
			}
		}
		if err := syncFile(p); err != nil {
			return err
		}
		m.Artifacts = append(m.Artifacts, Artifact{Name: a, Size: size, Blocks: blocks, SHA256: sum})
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(filepath.Join(st.dir, ManifestFile), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := syncDir(st.dir); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	final := st.store.Path(st.name, "")
	err = unix.Renameat2(unix.AT_FDCWD, st.dir, unix.AT_FDCWD, final, unix.RENAME_EXCHANGE)
	switch {
	case err == nil:
		// st.dir now holds the old image.
	case errors.Is(err, unix.ENOENT):
		// No old image: a plain rename.
		if err := os.Rename(st.dir, final); err != nil {
			return err
		}
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS):
		old := filepath.Join(st.store.Dir, ".old-"+st.name+"-"+randomSuffix())
		if err := os.Rename(final, old); err != nil {
			return err
		}
		if err := os.Rename(st.dir, final); err != nil {
			os.Rename(old, final) // put the old image back
			return err
		}
		st.dir = old
	default:
		return fmt.Errorf("publishing %s: %w", final, err)
	}
	if err := syncDir(st.store.Dir); err != nil {
		return err
	}
	st.done = true
	defer st.unlock()
	// Whatever st.dir holds now is the previous image (or nothing).
	if _, err := os.Stat(st.dir); err == nil {
		return safeRemoveAll(st.dir)
	}
	return nil
}

func randomSuffix() string {
	var b [6]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func syncFile(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func syncDir(p string) error { return syncFile(p) }

func writeFileSync(p string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// safeRemoveAll removes a directory tree but refuses if anything is still
// mounted below it: a leaked bind mount of /dev or /sys in a build's
// rootfs would otherwise have RemoveAll delete the host's files.
func safeRemoveAll(dir string) error {
	mounts, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("refusing to remove %s: still mounted below it: %s (unmount them first)", dir, strings.Join(mounts, ", "))
	}
	return os.RemoveAll(dir)
}

func mountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	prefix := filepath.Clean(dir) + "/"
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == filepath.Clean(dir) || strings.HasPrefix(mp, prefix) {
			out = append(out, mp)
		}
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for space ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
