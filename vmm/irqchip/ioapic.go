package irqchip

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/bus"
)

// IOAPIC register window (MMIO, 0xFEC00000 on PCs): an index register and
// a data window for the indirect registers, plus the EOI register of
// version 0x20 IOAPICs.
const (
	IOAPICRegSel = 0x00
	IOAPICWin    = 0x10
	IOAPICEOI    = 0x40
	IOAPICSize   = 0x1000

	// Indirect registers.
	ioapicID      = 0x00
	ioapicVersion = 0x01
	ioapicArb     = 0x02
	ioapicRedTbl  = 0x10 // 2 registers (low, high) per pin

	// IOAPICPins is the number of inputs (redirection entries).
	IOAPICPins = 24
)

// Redirection entry bits.
const (
	redVector   = 0xFF
	redMode     = 7 << 8
	redLogical  = 1 << 11
	redPending  = 1 << 12 // delivery status (read-only)
	redPolarity = 1 << 13
	redRemote   = 1 << 14 // remote IRR (read-only)
	redLevel    = 1 << 15
	redMasked   = 1 << 16
	redWritable = redVector | redMode | redLogical | redPolarity | redLevel | redMasked | 0xFF<<56
)

// IOAPIC is an I/O APIC with 24 inputs. Inputs are active-high logical
// levels (a device asserts or releases its line; polarity is recorded but
// the model's inputs are already "asserted" or not). It is a bus.Device
// for its MMIO window. Safe for concurrent use.
type IOAPIC struct {
	deliver func(Message)

	mu     sync.Mutex
	sel    uint32
	id     uint32
	redir  [IOAPICPins]uint64
	levels [IOAPICPins]bool // input line asserted

	delivered [IOAPICPins]int
}

// NewIOAPIC returns an IOAPIC with every entry masked; deliver sends its
// interrupt messages (called without the IOAPIC's lock held).
func NewIOAPIC(deliver func(Message)) *IOAPIC {
	a := &IOAPIC{deliver: deliver}
	for i := range a.redir {
		a.redir[i] = redMasked
	}
	return a
}

func (a *IOAPIC) messageLocked(pin int) Message {
	e := a.redir[pin]
	return Message{Vector: uint8(e), Mode: DeliveryMode(e >> 8 & 7), Logical: e&redLogical != 0,
		Dest: uint8(e >> 56), Level: e&redLevel != 0, Assert: true, Source: -1}
}

// serviceLocked delivers pin if it is asserted, unmasked and (for level
// triggering) not waiting for an EOI. It returns the message to send.
func (a *IOAPIC) serviceLocked(pin int, edge bool) (Message, bool) {
	e := a.redir[pin]
	if e&redMasked != 0 {
		return Message{}, false
	}
	if e&redLevel != 0 {
		if !a.levels[pin] || e&redRemote != 0 {
			return Message{}, false
		}
		a.redir[pin] |= redRemote
	} else if !edge {
		return Message{}, false
	}
	a.delivered[pin]++
	return a.messageLocked(pin), true
}

// SetLevel drives input pin. For an edge-triggered entry a rising edge
// sends the interrupt (an edge while masked is lost, as on hardware); for
// a level-triggered one the interrupt is sent while the line is asserted,
// once per EOI.
func (a *IOAPIC) SetLevel(pin int, asserted bool) error {
	if pin < 0 || pin >= IOAPICPins {
		return fmt.Errorf("ioapic: no input %d (0..%d)", pin, IOAPICPins-1)
	}
	a.mu.Lock()
	rising := asserted && !a.levels[pin]
	a.levels[pin] = asserted
	m, ok := a.serviceLocked(pin, rising)
	a.mu.Unlock()
	if ok {
		a.deliver(m)
	}
	return nil
}

// Pulse raises and lowers input pin (an edge-triggered device interrupt).
func (a *IOAPIC) Pulse(pin int) error {
	if err := a.SetLevel(pin, true); err != nil {
		return err
	}
	return a.SetLevel(pin, false)
}

// Line returns pin as a device interrupt line (Trigger pulses it).
func (a *IOAPIC) Line(pin int) bus.Interrupt { return ioapicLine{a, pin} }

type ioapicLine struct {
	a   *IOAPIC
	pin int
}

func (l ioapicLine) Trigger() error { return l.a.Pulse(l.pin) }

// EOI is a local APIC's EOI of a level-triggered vector: entries with that
// vector leave remote IRR, and are sent again if still asserted.
func (a *IOAPIC) EOI(vector uint8) {
	var msgs []Message
	a.mu.Lock()
	for pin := range a.redir {
		e := a.redir[pin]
		if e&redRemote != 0 && uint8(e) == vector {
			a.redir[pin] &^= redRemote
			if m, ok := a.serviceLocked(pin, false); ok {
				msgs = append(msgs, m)
			}
		}
	}
	a.mu.Unlock()
	for _, m := range msgs {
		a.deliver(m)
	}
}

// Delivered returns how many interrupts pin has sent.
func (a *IOAPIC) Delivered(pin int) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.delivered[pin]
}

// Read implements bus.Device (32-bit accesses to IOREGSEL and IOWIN).
func (a *IOAPIC) Read(off uint64, data []byte) {
	var v uint32
	a.mu.Lock()
	switch off &^ 3 {
	case IOAPICRegSel:
		v = a.sel
	case IOAPICWin:
		v = a.readLocked(a.sel)
	}
	a.mu.Unlock()
	var b [8]byte
	binary.LittleEndian.PutUint32(b[:], v)
	copy(data, b[off&3:])
}

func (a *IOAPIC) readLocked(reg uint32) uint32 {
	switch {
	case reg == ioapicID:
		return a.id
	case reg == ioapicVersion:
		return (IOAPICPins-1)<<16 | 0x20
	case reg == ioapicArb:
		return a.id
	case reg >= ioapicRedTbl && reg < ioapicRedTbl+2*IOAPICPins:
		e := a.redir[(reg-ioapicRedTbl)/2]
		if reg&1 == 1 {
			return uint32(e >> 32)
		}
		return uint32(e)
	}
	return 0
}

// Write implements bus.Device.
func (a *IOAPIC) Write(off uint64, data []byte) {
	if len(data) != 4 || off&3 != 0 {
		return
	}
	v := binary.LittleEndian.Uint32(data)
	var msgs []Message
	a.mu.Lock()
	switch off {
	case IOAPICRegSel:
		a.sel = v & 0xFF
	case IOAPICWin:
		msgs = a.writeLocked(a.sel, v)
	case IOAPICEOI:
		a.mu.Unlock()
		a.EOI(uint8(v))
		return
	}
	a.mu.Unlock()
	for _, m := range msgs {
		a.deliver(m)
	}
}

func (a *IOAPIC) writeLocked(reg, v uint32) []Message {
	switch {
	case reg == ioapicID:
		a.id = v & 0x0F000000
	case reg >= ioapicRedTbl && reg < ioapicRedTbl+2*IOAPICPins:
		pin := int(reg-ioapicRedTbl) / 2
		e := a.redir[pin]
		if reg&1 == 1 {
			e = e&0xFFFFFFFF | uint64(v)<<32
		} else {
			e = e&^0xFFFFFFFF | uint64(v)
		}
		e = e&redWritable | a.redir[pin]&redRemote
		if e&redLevel == 0 {
			e &^= redRemote
		}
		a.redir[pin] = e
		// Unmasking a level-triggered entry whose line is asserted sends it.
		if m, ok := a.serviceLocked(pin, false); ok {
			return []Message{m}
		}
	}
	return nil
}
