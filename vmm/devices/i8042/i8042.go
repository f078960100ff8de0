// Package i8042 is a minimal PS/2 controller: enough for Linux's
// keyboard-controller reboot (reboot=k writes 0xFE to port 0x64) and for
// probes to read sane values. There is no keyboard and no interrupt.
package i8042

import (
	"fmt"
	"log/slog"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// Internal register offsets; the ports in between (0x61 is the PC's
// system-control port B) are not the controller's, so the VMM registers the
// two one-byte views returned by Ports.
const (
	offData       = 0
	offCommand    = layout.I8042CommandPort - layout.I8042DataPort
	statusOBF     = 0x01 // output buffer full
	statusSYS     = 0x04 // system flag: self-test passed
	statusCMD     = 0x08 // last write was to the command port
	statusUnlock  = 0x10 // keyboard not inhibited
	cmdReadCTR    = 0x20
	cmdWriteCTR   = 0x60
	cmdSelfTest   = 0xaa
	cmdKbdTest    = 0xab
	cmdReadOut    = 0xd0
	cmdWriteOut   = 0xd1
	cmdPulseFirst = 0xf0
	ctrDefault    = 0x47 // kbd IRQ, SYS flag, translation
	outResetLine  = 0x01 // output port bit 0: CPU reset when low
	kbdAck        = 0xfa
	selfTestOK    = 0x55
)

// Controller is the i8042 PS/2 controller.
type Controller struct {
	onReset func()
	log     *slog.Logger

	mu      sync.Mutex
	ctr     byte
	outPort byte
	out     byte
	obf     bool
	pending byte // command awaiting its data byte (0 = none)
	lastCmd bool
}

// port is a one-byte bus.Device view of one controller register.
type port struct {
	c   *Controller
	off uint64
}

func (p port) Read(_ uint64, data []byte)  { p.c.Read(p.off, data) }
func (p port) Write(_ uint64, data []byte) { p.c.Write(p.off, data) }

// Ports returns the devices to register on the port-I/O bus, each with
// size 1: data at layout.I8042DataPort, command/status at
// layout.I8042CommandPort.
func (c *Controller) Ports() (data, command bus.Device) {
	return port{c, offData}, port{c, offCommand}
}

// New returns a controller that calls onReset (on the vCPU thread; it must
// not block) when the guest pulses the CPU reset line.
func New(onReset func(), log *slog.Logger) *Controller {
	if log == nil {
		log = slog.Default()
	}
	return &Controller{onReset: onReset, log: log, ctr: ctrDefault, outPort: outResetLine}
}

// Read reads register offset (0 = data, 4 = status).
func (c *Controller) Read(offset uint64, data []byte) {
	clear(data)
	if len(data) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch offset {
	case offData:
		data[0] = c.out
		c.obf = false
	case offCommand:
		s := byte(statusSYS | statusUnlock)
		if c.obf {
			s |= statusOBF
		}
		if c.lastCmd {
			s |= statusCMD
		}
		data[0] = s
	}
}

func (c *Controller) reply(b byte) { c.out, c.obf = b, true }

// Write writes register offset (0 = data, 4 = command).
func (c *Controller) Write(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	reset := false
	c.mu.Lock()
	switch offset {
	case offCommand:
		c.lastCmd = true
		reset = c.command(v)
	case offData:
		c.lastCmd = false
		switch c.pending {
		case cmdWriteCTR:
			c.ctr = v
		case cmdWriteOut:
			reset = v&outResetLine == 0
			c.outPort = v
		default:
			c.reply(kbdAck) // no keyboard attached; acknowledge anyway
		}
		c.pending = 0
	}
	c.mu.Unlock()
	if reset {
		c.log.Info("i8042: guest requested a reset")
		if c.onReset != nil {
			c.onReset()
		}
	}
}

// command runs controller command v and reports whether it resets the CPU.
func (c *Controller) command(v byte) bool {
	switch {
	case v == cmdReadCTR:
		c.reply(c.ctr)
	case v == cmdWriteCTR || v == cmdWriteOut:
		c.pending = v
	case v == cmdSelfTest:
		c.reply(selfTestOK)
	case v == cmdKbdTest:
		c.reply(0)
	case v == cmdReadOut:
		c.reply(c.outPort)
	case v >= cmdPulseFirst:
		// Pulse output lines whose bits are 0 in the low nibble; bit 0 is
		// the reset line (0xFE is the classic reboot).
		return v&outResetLine == 0
	default:
		c.log.Debug("i8042: ignoring command", "cmd", v)
	}
	return false
}

// StateVersion is the current version of State.
const StateVersion = 1

// State is the controller state (version 1).
type State struct {
	Version    uint32
	CTR        byte
	OutputPort byte
	Out        byte
	OBF        bool
	Pending    byte
	LastCmd    bool
}

// State captures the controller.
func (c *Controller) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return State{Version: StateVersion, CTR: c.ctr, OutputPort: c.outPort, Out: c.out, OBF: c.obf, Pending: c.pending, LastCmd: c.lastCmd}
}

// Restore loads s.
func (c *Controller) Restore(s State) error {
	if s.Version != StateVersion {
		return fmt.Errorf("i8042 state version %d, want %d", s.Version, StateVersion)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ctr, c.outPort, c.out, c.obf, c.pending, c.lastCmd = s.CTR, s.OutputPort, s.Out, s.OBF, s.Pending, s.LastCmd
	return nil
}
