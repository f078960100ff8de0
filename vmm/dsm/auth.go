package dsm

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Error codes sent in MsgError.
const (
	CodeAuth     = 1 // authentication failed
	CodeProtocol = 2 // malformed or unexpected frame
	CodeRefused  = 3 // well-formed but not acceptable (wrong VM, slice id, duplicate)
	CodePeerLost = 4 // the sender lost another slice and is stopping the VM
)

// ErrAuth reports a failed handshake.
var ErrAuth = errors.New("dsm: authentication failed")

// proof is HMAC-SHA256(secret, role || vmID || dialer || acceptor ||
// dialer nonce || acceptor nonce). The role label keeps one side's proof
// from being replayed as the other's.
func proof(secret []byte, role, vmID string, dialer, acceptor uint16, nd, na [NonceSize]byte) [MACSize]byte {
	h := hmac.New(sha256.New, secret)
	h.Write([]byte("hpcvm-dsm-v1 " + role + "\x00"))
	var l [1]byte
	l[0] = byte(len(vmID))
	h.Write(l[:])
	h.Write([]byte(vmID))
	var ids [4]byte
	binary.BigEndian.PutUint16(ids[:], dialer)
	binary.BigEndian.PutUint16(ids[2:], acceptor)
	h.Write(ids[:])
	h.Write(nd[:])
	h.Write(na[:])
	var out [MACSize]byte
	copy(out[:], h.Sum(nil))
	return out
}

func writeMsg(w io.Writer, m *Msg) error {
	b, err := AppendFrame(nil, m)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// readHandshake reads one frame and checks its type; a MsgError from the
// peer becomes an error carrying its text.
func readHandshake(fr *FrameReader, want MsgType) (Msg, error) {
	m, err := fr.Read()
	if err != nil {
		return Msg{}, err
	}
	if m.Type == MsgError {
		return Msg{}, fmt.Errorf("peer refused: %s (code %d)", m.Text, m.Code)
	}
	if m.Type != want {
		return Msg{}, fmt.Errorf("%w: got %v during handshake, want %v", ErrProtocol, m.Type, want)
	}
	return m, nil
}

// dialHandshake authenticates an outgoing connection from slice self to
// slice peer. Both sides prove knowledge of the secret; the acceptor
// proves first so a dialer never talks to an impostor.
func dialHandshake(c net.Conn, fr *FrameReader, secret []byte, vmID string, self, peer int, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	hello := Msg{Type: MsgHello, From: uint16(self), To: uint16(peer), VMID: vmID}
	if _, err := rand.Read(hello.Nonce[:]); err != nil {
		return err
	}
	if err := writeMsg(c, &hello); err != nil {
		return fmt.Errorf("sending hello: %w", err)
	}
	ch, err := readHandshake(fr, MsgChallenge)
	if err != nil {
		return err
	}
	want := proof(secret, "acceptor", vmID, uint16(self), uint16(peer), hello.Nonce, ch.Nonce)
	if !hmac.Equal(want[:], ch.MAC[:]) {
		writeMsg(c, &Msg{Type: MsgError, Code: CodeAuth, Text: "authentication failed"})
		return fmt.Errorf("%w: slice %d did not prove the VM secret", ErrAuth, peer)
	}
	p := Msg{Type: MsgProof, MAC: proof(secret, "dialer", vmID, uint16(self), uint16(peer), hello.Nonce, ch.Nonce)}
	if err := writeMsg(c, &p); err != nil {
		return fmt.Errorf("sending proof: %w", err)
	}
	_, err = readHandshake(fr, MsgWelcome)
	return err
}

// acceptHandshake authenticates an incoming connection to slice self of an
// n-slice VM and returns the dialer's slice id. Only slices with a higher
// id dial (accept returns an error for anything else). On failure the peer
// gets a MsgError and must be disconnected; it has seen no guest data.
func acceptHandshake(c net.Conn, fr *FrameReader, secret []byte, vmID string, self, n int, timeout time.Duration) (int, error) {
	c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	refuse := func(code uint16, text string, err error) (int, error) {
		writeMsg(c, &Msg{Type: MsgError, Code: code, Text: text})
		return -1, err
	}
	hello, err := readHandshake(fr, MsgHello)
	if err != nil {
		return refuse(CodeProtocol, "expected hello", err)
	}
	if hello.VMID != vmID {
		return refuse(CodeRefused, "wrong VM", fmt.Errorf("dsm: hello for VM %q, this is %q", hello.VMID, vmID))
	}
	from := int(hello.From)
	if int(hello.To) != self || from <= self || from >= n {
		return refuse(CodeRefused, "bad slice ids", fmt.Errorf("dsm: hello from slice %d to %d, this is slice %d of %d", hello.From, hello.To, self, n))
	}
	ch := Msg{Type: MsgChallenge}
	if _, err := rand.Read(ch.Nonce[:]); err != nil {
		return -1, err
	}
	ch.MAC = proof(secret, "acceptor", vmID, hello.From, hello.To, hello.Nonce, ch.Nonce)
	if err := writeMsg(c, &ch); err != nil {
		return -1, fmt.Errorf("sending challenge: %w", err)
	}
	p, err := readHandshake(fr, MsgProof)
	if err != nil {
		return refuse(CodeProtocol, "expected proof", err)
	}
	want := proof(secret, "dialer", vmID, hello.From, hello.To, hello.Nonce, ch.Nonce)
	if !hmac.Equal(want[:], p.MAC[:]) {
		return refuse(CodeAuth, "authentication failed", fmt.Errorf("%w: peer claiming to be slice %d has no valid proof", ErrAuth, from))
	}
	if err := writeMsg(c, &Msg{Type: MsgWelcome}); err != nil {
		return -1, err
	}
	return from, nil
}
