package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	msgs := []struct {
		t   Type
		msg any
	}{
		{THello, &Hello{Protocol: Name, Version: Version, Agent: "dev"}},
		{TError, &Error{Code: CodeNotFound, Message: "no such file"}},
		{TPing, &Ping{}},
		{TPong, &Pong{Agent: "dev", TimeNano: 5, UptimeNS: 7}},
		{TExec, &Exec{Argv: []string{"/bin/sh", "-c", "id"}, Env: []string{"A=b"}, Dir: "/tmp", Cred: &Credential{UID: 65534, GID: 65534}, Stdin: true}},
		{TStarted, &Started{PID: 42}},
		{TExit, &Exit{Signal: 9}},
		{TSignal, &Signal{PID: 42, Signal: 15}},
		{TCopyIn, &CopyIn{Path: "/tmp/job.sh", Mode: 0o755, MkdirAll: true}},
		{TCopyDone, &CopyDone{Size: 3, SHA256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}},
		{TPoweroff, &Poweroff{Reboot: true}},
		{TFreeze, &Freeze{Paths: []string{"/"}, AutoThawNS: 1e9}},
		{TThaw, &Thaw{}},
		{TSetClock, &SetClock{UnixNano: 1700000000e9}},
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		if err := WriteMsg(&buf, m.t, m.msg); err != nil {
			t.Fatalf("WriteMsg(%s): %v", m.t, err)
		}
	}
	if err := WriteFrame(&buf, TStdout, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := WriteFrame(&buf, TOK, nil); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&buf)
	for _, m := range msgs {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("ReadFrame for %s: %v", m.t, err)
		}
		if f.Type != m.t {
			t.Fatalf("type %s, want %s", f.Type, m.t)
		}
		got, err := Decode(f)
		if err != nil {
			t.Fatalf("Decode(%s): %v", m.t, err)
		}
		if !reflect.DeepEqual(got, m.msg) {
			t.Errorf("%s: got %#v, want %#v", m.t, got, m.msg)
		}
	}
	f, err := r.ReadFrame()
	if err != nil || f.Type != TStdout || string(f.Payload) != "hello" {
		t.Fatalf("data frame: %v %s %q", err, f.Type, f.Payload)
	}
	f, err = r.ReadFrame()
	if err != nil || f.Type != TOK || len(f.Payload) != 0 {
		t.Fatalf("ok frame: %v %s %q", err, f.Type, f.Payload)
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("end: %v, want io.EOF", err)
	}
}

func frame(t Type, p string) []byte {
	b := make([]byte, HeaderSize+len(p))
	binary.BigEndian.PutUint32(b, uint32(len(p)))
	b[4] = byte(t)
	copy(b[HeaderSize:], p)
	return b
}

func TestDecodeErrors(t *testing.T) {
	huge := make([]byte, HeaderSize)
	binary.BigEndian.PutUint32(huge, MaxPayload+1)
	huge[4] = byte(TStdout)
	tests := []struct {
		name string
		in   []byte
		want error // nil: any error is fine but must not be nil
	}{
		{"too large", huge, ErrTooLarge},
		{"type zero", frame(0, ""), ErrUnknownType},
		{"type unknown", frame(200, ""), ErrUnknownType},
		{"ok with payload", frame(TOK, "x"), ErrBadPayload},
		{"truncated payload", frame(TExec, `{"argv":["x"]}`)[:10], io.ErrUnexpectedEOF},
		{"truncated header", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"unknown field", frame(TExec, `{"argv":["x"],"bogus":1}`), ErrBadPayload},
		{"empty argv", frame(TExec, `{"argv":[]}`), ErrBadPayload},
		{"relative dir", frame(TExec, `{"argv":["x"],"dir":"tmp"}`), ErrBadPayload},
		{"bad env", frame(TExec, `{"argv":["x"],"env":["NOEQUALS"]}`), ErrBadPayload},
		{"trailing json", frame(TPing, `{} {}`), ErrBadPayload},
		{"not json", frame(TPing, `nope`), ErrBadPayload},
		{"relative copy path", frame(TCopyIn, `{"path":"a/b","mode":420}`), ErrBadPayload},
		{"unclean copy path", frame(TCopyIn, `{"path":"/a/../b","mode":420}`), ErrBadPayload},
		{"mode too wide", frame(TCopyIn, `{"path":"/a","mode":65536}`), ErrBadPayload},
		{"signal zero", frame(TSignal, `{"pid":1,"signal":0}`), ErrBadPayload},
		{"clock before epoch", frame(TSetClock, `{"unix_nano":-1}`), ErrBadPayload},
		{"wrong hello", frame(THello, `{"protocol":"ssh","version":1}`), ErrBadPayload},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.in))
			f, err := r.ReadFrame()
			if err == nil {
				_, err = Decode(f)
			}
			if err == nil {
				t.Fatalf("no error")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
}

func TestReadMsgError(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteMsg(&buf, TError, &Error{Code: CodeBusy, Message: "frozen"}); err != nil {
		t.Fatal(err)
	}
	_, err := ReadMsg(NewReader(&buf), TOK)
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeBusy {
		t.Fatalf("ReadMsg: %v, want *Error busy", err)
	}
}

// FuzzDecode feeds arbitrary bytes to the frame reader and message decoder:
// they must never panic, and whatever decodes must re-encode to a frame
// that decodes to the same message.
func FuzzDecode(f *testing.F) {
	f.Add(frame(THello, `{"protocol":"hpcvm-agent","version":1}`))
	f.Add(frame(TExec, `{"argv":["/bin/true"],"env":["A=B"],"dir":"/","cred":{"uid":1,"gid":2,"groups":[3]},"stdin":true}`))
	f.Add(append(frame(TStdin, "abc"), frame(TStdinClose, "")...))
	f.Add(frame(TCopyIn, `{"path":"/x","mode":493}`))
	f.Add(frame(TFreeze, `{"paths":["/"],"auto_thaw_ns":5}`))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1})
	f.Add(frame(TExec, "{\"argv\":[\"/bi\xffn/true\"],\"cred\":{\"uid\":1,\"gid\":2,\"groups\":[]}}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b))
		for {
			fr, err := r.ReadFrame()
			if err != nil {
				return
			}
			if len(fr.Payload) > MaxPayload {
				t.Fatalf("payload %d > max", len(fr.Payload))
			}
			m, err := Decode(fr)
			if err != nil || m == nil {
				continue
			}
			var buf bytes.Buffer
			if err := WriteMsg(&buf, fr.Type, m); err != nil {
				t.Fatalf("re-encode %s: %v", fr.Type, err)
			}
			f2, err := NewReader(bytes.NewReader(buf.Bytes())).ReadFrame()
			if err != nil {
				t.Fatalf("re-read %s: %v", fr.Type, err)
			}
			m2, err := Decode(f2)
			if err != nil {
				t.Fatalf("re-decode %s: %v", fr.Type, err)
			}
			// Compare encodings: JSON legitimately maps [] and null
			// (omitempty) to the same message.
			var buf2 bytes.Buffer
			if err := WriteMsg(&buf2, fr.Type, m2); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf.Bytes(), buf2.Bytes()) {
				t.Fatalf("%s: %q != %q", fr.Type, buf.Bytes(), buf2.Bytes())
			}
		}
	})
}
