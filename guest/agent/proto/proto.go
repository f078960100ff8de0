// Package proto is the wire protocol between the hpcvm host and the guest
// agent (docs/agent.md). A connection carries length-prefixed frames:
//
//	uint32 length (big endian, payload bytes only) | uint8 type | payload
//
// Data frames (stdin, stdout, stderr, file data) carry raw bytes; control
// frames carry one JSON object whose fields are decoded strictly. Every
// connection starts with a Hello from each side and then serves exactly one
// request, so a slow request never blocks another.
package proto

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"time"
	"unicode/utf8"
)

// Version is the newest protocol version this package speaks. A change that
// an old peer could misread (new type, new field, new meaning) increments it.
// The host's Hello names the newest version it speaks; the agent answers
// with the version both use, the lower of the two, and refuses a host older
// than MinVersion.
//
//	1: one request per connection.
//	2: the host may also send Signal frames on an Exec stream, so a signal
//	   needs no new connection (a connect and two handshake round trips
//	   cost seconds in a guest spread over nodes).
const Version = 2

// MinVersion is the oldest host version an agent still serves.
const MinVersion = 1

// Name identifies the protocol in Hello, so a peer that is not an hpcvm agent
// is recognised instead of misparsed.
const Name = "hpcvm-agent"

// DefaultPort is the vsock port the agent listens on unless told otherwise.
const DefaultPort = 1024

// MaxPayload bounds one frame's payload so a corrupt or hostile length cannot
// make the reader allocate without limit. Writers split data into ChunkSize.
const MaxPayload = 1 << 20

// ChunkSize is the data frame size writers use.
const ChunkSize = 64 << 10

// HeaderSize is the length of a frame header.
const HeaderSize = 5

// Type is a frame type.
type Type uint8

// Frame types. Values are part of the wire format: never renumber.
const (
	THello       Type = 1  // both directions, first frame: Hello
	TError       Type = 2  // agent -> host: Error, ends the request
	TOK          Type = 3  // agent -> host: empty, request done
	TPing        Type = 4  // host: Ping
	TPong        Type = 5  // agent: Pong
	TExec        Type = 6  // host: Exec
	TStarted     Type = 7  // agent: Started
	TStdin       Type = 8  // host: raw stdin bytes
	TStdinClose  Type = 9  // host: empty, end of stdin
	TStdout      Type = 10 // agent: raw stdout bytes
	TStderr      Type = 11 // agent: raw stderr bytes
	TExit        Type = 12 // agent: Exit, last frame of an Exec
	TSignal      Type = 13 // host: Signal (to a process started by the agent)
	TCopyIn      Type = 14 // host: CopyIn, then TData frames and TDataEnd
	TData        Type = 15 // host: raw file bytes
	TDataEnd     Type = 16 // host: empty, end of file data
	TCopyDone    Type = 17 // agent: CopyDone
	TPoweroff    Type = 18 // host: Poweroff
	TFreeze      Type = 19 // host: Freeze
	TThaw        Type = 20 // host: Thaw
	TSetClock    Type = 21 // host: SetClock
	maxKnownType      = TSetClock
)

var typeNames = map[Type]string{
	THello: "hello", TError: "error", TOK: "ok", TPing: "ping", TPong: "pong",
	TExec: "exec", TStarted: "started", TStdin: "stdin", TStdinClose: "stdin-close",
	TStdout: "stdout", TStderr: "stderr", TExit: "exit", TSignal: "signal",
	TCopyIn: "copy-in", TData: "data", TDataEnd: "data-end", TCopyDone: "copy-done",
	TPoweroff: "poweroff", TFreeze: "freeze", TThaw: "thaw", TSetClock: "set-clock",
}

func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// IsData reports whether frames of type t carry raw bytes (not JSON).
func (t Type) IsData() bool {
	switch t {
	case TStdin, TStdout, TStderr, TData:
		return true
	}
	return false
}

// isEmpty reports whether frames of type t must have an empty payload.
func (t Type) isEmpty() bool {
	switch t {
	case TOK, TStdinClose, TDataEnd:
		return true
	}
	return false
}

// Frame is one decoded frame. Payload aliases the reader's buffer until the
// next ReadFrame on the same Reader.
type Frame struct {
	Type    Type
	Payload []byte
}

// Errors classifying a malformed stream; wrapped with details.
var (
	ErrTooLarge    = errors.New("frame payload too large")
	ErrUnknownType = errors.New("unknown frame type")
	ErrBadPayload  = errors.New("bad frame payload")
)

// Reader reads frames, reusing one buffer.
type Reader struct {
	r   io.Reader
	hdr [HeaderSize]byte
	buf []byte
}

// NewReader returns a frame reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// ReadFrame reads the next frame. It returns io.EOF only on a clean end
// between frames; a stream cut inside a frame is io.ErrUnexpectedEOF.
func (fr *Reader) ReadFrame() (Frame, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return Frame{}, err
	}
	n := binary.BigEndian.Uint32(fr.hdr[:4])
	t := Type(fr.hdr[4])
	if n > MaxPayload {
		return Frame{}, fmt.Errorf("%w: %s frame of %d bytes (max %d)", ErrTooLarge, t, n, MaxPayload)
	}
	if t == 0 || t > maxKnownType {
		return Frame{}, fmt.Errorf("%w: %d", ErrUnknownType, uint8(t))
	}
	if t.isEmpty() && n != 0 {
		return Frame{}, fmt.Errorf("%w: %s frame must be empty, has %d bytes", ErrBadPayload, t, n)
	}
	if cap(fr.buf) < int(n) {
		fr.buf = make([]byte, n)
	}
	p := fr.buf[:n]
	if _, err := io.ReadFull(fr.r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, fmt.Errorf("reading %s frame payload: %w", t, err)
	}
	return Frame{Type: t, Payload: p}, nil
}

// WriteFrame writes one frame. Callers serialise concurrent writers.
func WriteFrame(w io.Writer, t Type, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%w: %s frame of %d bytes", ErrTooLarge, t, len(payload))
	}
	// One Write per frame: header and payload together, so a frame is never
	// interleaved with another writer's even on an unbuffered conn.
	b := make([]byte, HeaderSize+len(payload))
	binary.BigEndian.PutUint32(b[:4], uint32(len(payload)))
	b[4] = byte(t)
	copy(b[HeaderSize:], payload)
	_, err := w.Write(b)
	return err
}

// WriteMsg writes a control frame with msg encoded as JSON.
func WriteMsg(w io.Writer, t Type, msg any) error {
	b, err := json.Marshal(msg)
	if err != nil {
		return fmt.Errorf("encoding %s: %w", t, err)
	}
	return WriteFrame(w, t, b)
}

// Hello opens each direction of a connection.
type Hello struct {
	Protocol string `json:"protocol"`
	Version  int    `json:"version"`
	Agent    string `json:"agent,omitempty"` // agent build version (agent -> host)
}

// Error codes, so callers can act on a failure class without parsing text.
const (
	CodeNotFound   = "not-found"  // executable or file missing
	CodePermission = "permission" // EPERM/EACCES
	CodeInvalid    = "invalid"    // malformed or unsupported request
	CodeVersion    = "version"    // protocol version mismatch
	CodeBusy       = "busy"       // e.g. already frozen
	CodeInternal   = "internal"   // anything else
)

// Error ends a request that failed.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return "agent: " + e.Code + ": " + e.Message }

// Ping asks for a Pong; it carries nothing.
type Ping struct{}

// Pong answers Ping.
type Pong struct {
	Agent    string `json:"agent"`     // agent build version
	TimeNano int64  `json:"time_nano"` // guest CLOCK_REALTIME, ns since the epoch
	UptimeNS int64  `json:"uptime_ns"` // agent uptime
}

// Credential is the identity a command runs as.
type Credential struct {
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"`
}

// Exec runs a command. The agent answers Started (or Error), then streams
// Stdout/Stderr frames, then Exit. The host may send Stdin frames and
// StdinClose after Started.
type Exec struct {
	Argv  []string    `json:"argv"`
	Env   []string    `json:"env,omitempty"` // whole environment; empty: agent default PATH only
	Dir   string      `json:"dir,omitempty"` // absolute; empty: "/"
	Cred  *Credential `json:"cred,omitempty"`
	Stdin bool        `json:"stdin,omitempty"` // false: stdin is /dev/null
}

// Started reports the pid (also the process group id) of a started command.
type Started struct {
	PID int `json:"pid"`
}

// Exit is the final status of a command.
type Exit struct {
	Code       int  `json:"code"`             // exit code when Signal == 0
	Signal     int  `json:"signal,omitempty"` // terminating signal number, 0 if it exited
	CoreDumped bool `json:"core_dumped,omitempty"`
}

// Signal sends a signal to the process group of a command the agent started.
type Signal struct {
	PID    int `json:"pid"`
	Signal int `json:"signal"`
}

// CopyIn writes a file: data follows in TData frames up to TDataEnd. The
// agent writes a temporary file beside Path, fsyncs it and renames it in, so
// Path is either the old or the complete new file.
type CopyIn struct {
	Path     string `json:"path"` // absolute
	Mode     uint32 `json:"mode"` // permission bits (and setuid/setgid/sticky)
	UID      uint32 `json:"uid"`
	GID      uint32 `json:"gid"`
	MkdirAll bool   `json:"mkdir_all,omitempty"` // create missing parents (0755, root)
}

// CopyDone answers a completed CopyIn.
type CopyDone struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // hex
}

// Poweroff syncs filesystems and powers the guest off (or reboots it). The
// agent answers OK first; the connection then drops when the guest stops.
type Poweroff struct {
	Reboot bool `json:"reboot,omitempty"`
}

// Freeze freezes filesystems (FIFREEZE) in order; on failure the ones
// already frozen are thawed. AutoThawNS > 0 thaws them after that long if no
// Thaw came, so a lost host cannot leave the guest frozen forever.
type Freeze struct {
	Paths      []string `json:"paths,omitempty"` // mount points; empty: "/"
	AutoThawNS int64    `json:"auto_thaw_ns,omitempty"`
}

// Thaw thaws filesystems frozen by Freeze, in reverse order; empty Paths
// thaws everything the agent froze.
type Thaw struct {
	Paths []string `json:"paths,omitempty"`
}

// SetClock sets the guest's CLOCK_REALTIME.
type SetClock struct {
	UnixNano int64 `json:"unix_nano"`
}

// Validate checks fields the JSON decoder cannot.
func (m *Hello) Validate() error {
	if m.Protocol != Name {
		return fmt.Errorf("hello: protocol %q, want %q", m.Protocol, Name)
	}
	if m.Version < 1 {
		return fmt.Errorf("hello: version %d", m.Version)
	}
	return nil
}

func (m *Error) Validate() error {
	if m.Code == "" {
		return errors.New("error: empty code")
	}
	return nil
}

func (m *Ping) Validate() error { return nil }
func (m *Pong) Validate() error { return nil }

func (m *Exec) Validate() error {
	if len(m.Argv) == 0 || m.Argv[0] == "" {
		return errors.New("exec: empty argv")
	}
	if m.Dir != "" && !path.IsAbs(m.Dir) {
		return fmt.Errorf("exec: dir %q is not absolute", m.Dir)
	}
	for i, s := range append(append([]string{m.Dir}, m.Argv...), m.Env...) {
		if bytes.IndexByte([]byte(s), 0) >= 0 {
			return fmt.Errorf("exec: argument/env %d contains NUL", i)
		}
		// JSON strings are Unicode: bytes that are not UTF-8 would arrive
		// changed, so the sender must refuse them instead.
		if !utf8.ValidString(s) {
			return fmt.Errorf("exec: argument/env %d is not valid UTF-8", i)
		}
	}
	for _, e := range m.Env {
		if k, _, ok := bytes.Cut([]byte(e), []byte("=")); !ok || len(k) == 0 {
			return fmt.Errorf("exec: env entry %q is not KEY=VALUE", e)
		}
	}
	return nil
}

func (m *Started) Validate() error {
	if m.PID <= 0 {
		return fmt.Errorf("started: pid %d", m.PID)
	}
	return nil
}

func (m *Exit) Validate() error {
	if m.Signal < 0 || m.Signal > 64 || m.Code < 0 || m.Code > 255 {
		return fmt.Errorf("exit: code %d signal %d out of range", m.Code, m.Signal)
	}
	return nil
}

func (m *Signal) Validate() error {
	if m.PID <= 0 {
		return fmt.Errorf("signal: pid %d", m.PID)
	}
	if m.Signal <= 0 || m.Signal > 64 {
		return fmt.Errorf("signal: number %d out of range 1..64", m.Signal)
	}
	return nil
}

func (m *CopyIn) Validate() error {
	if !path.IsAbs(m.Path) || path.Clean(m.Path) != m.Path || m.Path == "/" {
		return fmt.Errorf("copy-in: path %q must be absolute, clean and not /", m.Path)
	}
	if bytes.IndexByte([]byte(m.Path), 0) >= 0 || !utf8.ValidString(m.Path) {
		return errors.New("copy-in: path contains NUL or is not UTF-8")
	}
	if m.Mode&^0o7777 != 0 {
		return fmt.Errorf("copy-in: mode %#o has bits beyond 07777", m.Mode)
	}
	return nil
}

func (m *CopyDone) Validate() error {
	if m.Size < 0 || len(m.SHA256) != 64 {
		return fmt.Errorf("copy-done: size %d sha256 %q", m.Size, m.SHA256)
	}
	return nil
}

func (m *Poweroff) Validate() error { return nil }

func validPaths(what string, ps []string) error {
	for _, p := range ps {
		if !path.IsAbs(p) || bytes.IndexByte([]byte(p), 0) >= 0 {
			return fmt.Errorf("%s: path %q is not absolute", what, p)
		}
	}
	return nil
}

func (m *Freeze) Validate() error {
	if m.AutoThawNS < 0 {
		return fmt.Errorf("freeze: negative auto_thaw_ns %d", m.AutoThawNS)
	}
	return validPaths("freeze", m.Paths)
}

func (m *Thaw) Validate() error { return validPaths("thaw", m.Paths) }

func (m *SetClock) Validate() error {
	if m.UnixNano <= 0 {
		return fmt.Errorf("set-clock: unix_nano %d is not after the epoch", m.UnixNano)
	}
	return nil
}

// Time returns the requested time.
func (m *SetClock) Time() time.Time { return time.Unix(0, m.UnixNano) }

type validator interface{ Validate() error }

// newMsg returns a fresh value for a control frame type.
func newMsg(t Type) validator {
	switch t {
	case THello:
		return &Hello{}
	case TError:
		return &Error{}
	case TPing:
		return &Ping{}
	case TPong:
		return &Pong{}
	case TExec:
		return &Exec{}
	case TStarted:
		return &Started{}
	case TExit:
		return &Exit{}
	case TSignal:
		return &Signal{}
	case TCopyIn:
		return &CopyIn{}
	case TCopyDone:
		return &CopyDone{}
	case TPoweroff:
		return &Poweroff{}
	case TFreeze:
		return &Freeze{}
	case TThaw:
		return &Thaw{}
	case TSetClock:
		return &SetClock{}
	}
	return nil
}

// Decode decodes and validates a control frame into its message type
// (*Hello, *Exec, ...). Data and empty frames decode to nil.
func Decode(f Frame) (any, error) {
	if f.Type.IsData() || f.Type.isEmpty() {
		return nil, nil
	}
	m := newMsg(f.Type)
	if m == nil {
		return nil, fmt.Errorf("%w: %d", ErrUnknownType, uint8(f.Type))
	}
	d := json.NewDecoder(bytes.NewReader(f.Payload))
	// Strict: a field this version does not know means the peer speaks a
	// version we do not, and guessing could run the wrong thing.
	d.DisallowUnknownFields()
	if err := d.Decode(m); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadPayload, f.Type, err)
	}
	if d.More() {
		return nil, fmt.Errorf("%w: %s: trailing data after the JSON object", ErrBadPayload, f.Type)
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPayload, err)
	}
	return m, nil
}

// ReadMsg reads the next frame, requires type want and decodes it into a
// message. An Error frame is returned as *Error.
func ReadMsg(fr *Reader, want Type) (any, error) {
	f, err := fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	m, err := Decode(f)
	if err != nil {
		return nil, err
	}
	if f.Type == TError && want != TError {
		return nil, m.(*Error)
	}
	if f.Type != want {
		return nil, fmt.Errorf("%w: got %s frame, want %s", ErrBadPayload, f.Type, want)
	}
	return m, nil
}
