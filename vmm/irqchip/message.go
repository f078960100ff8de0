// Package irqchip emulates the x86 interrupt controllers in the VMM: a
// local APIC per vCPU (xAPIC, MMIO at 0xFEE00000) and an IOAPIC. A
// distributed VM (docs/dsm.md) needs them in userspace because a vCPU's
// interrupts may come from another node: KVM's in-kernel irqchip only
// knows the vCPUs of its own process. The models know nothing of KVM or
// the network: they take register accesses and interrupt messages, and
// call back when a vCPU has something to take (Notify), when the guest
// sends an IPI (Send), and when a level-triggered interrupt is EOIed.
package irqchip

import "fmt"

// DeliveryMode is an interrupt message's delivery mode (ICR and
// redirection entry bits 10:8, MSI data bits 10:8).
type DeliveryMode uint8

// Delivery modes.
const (
	Fixed          DeliveryMode = 0
	LowestPriority DeliveryMode = 1
	SMI            DeliveryMode = 2
	NMI            DeliveryMode = 4
	INIT           DeliveryMode = 5
	StartUp        DeliveryMode = 6
	ExtINT         DeliveryMode = 7
)

// Valid reports whether d is an architectural delivery mode.
func (d DeliveryMode) Valid() bool { return d <= 7 && d != 3 }

func (d DeliveryMode) String() string {
	switch d {
	case Fixed:
		return "fixed"
	case LowestPriority:
		return "lowest-priority"
	case SMI:
		return "SMI"
	case NMI:
		return "NMI"
	case INIT:
		return "INIT"
	case StartUp:
		return "SIPI"
	case ExtINT:
		return "ExtINT"
	}
	return fmt.Sprintf("mode-%d", uint8(d))
}

// Destination shorthands (ICR bits 19:18).
const (
	NoShorthand  = 0
	Self         = 1
	AllInclSelf  = 2
	AllExclSelf  = 3
	BroadcastID  = 0xFF // physical or logical destination 0xFF: every APIC
	flatModel    = 0xF  // DFR model: flat
	clusterModel = 0x0  // DFR model: cluster
)

// Message is an interrupt message on the (virtual) APIC bus: written by a
// guest to a local APIC's ICR, sent by the IOAPIC for a redirection entry,
// or by a device as an MSI.
type Message struct {
	Vector    uint8
	Mode      DeliveryMode
	Logical   bool  // destination mode: logical (else physical)
	Dest      uint8 // xAPIC destination: APIC ID, or logical destination
	Level     bool  // trigger mode: level (else edge)
	Assert    bool  // level: assert (an INIT de-assert is ignored)
	Shorthand uint8 // NoShorthand, Self, AllInclSelf, AllExclSelf
	Source    int   // sending vCPU for shorthands; -1 for IOAPIC and MSI
}

func (m Message) String() string {
	dst := fmt.Sprintf("physical %d", m.Dest)
	if m.Logical {
		dst = fmt.Sprintf("logical %#x", m.Dest)
	}
	switch m.Shorthand {
	case Self:
		dst = "self"
	case AllInclSelf:
		dst = "all"
	case AllExclSelf:
		dst = "all but self"
	}
	trig := "edge"
	if m.Level {
		trig = "level"
	}
	return fmt.Sprintf("%v vector %#x to %s (%s)", m.Mode, m.Vector, dst, trig)
}

// MSIMessage decodes a message-signalled interrupt (address and data as a
// device writes them to 0xFEExxxxx).
func MSIMessage(addr uint64, data uint32) Message {
	return Message{
		Vector:  uint8(data),
		Mode:    DeliveryMode(data >> 8 & 7),
		Level:   data&(1<<15) != 0,
		Assert:  data&(1<<14) != 0 || data&(1<<15) == 0,
		Logical: addr&(1<<2) != 0,
		Dest:    uint8(addr >> 12),
		Source:  -1,
	}
}

// View is the part of a local APIC's state that decides whether a message
// is for it. Every slice keeps the views of all vCPUs (docs/dsm.md) so it
// can resolve destinations without asking.
type View struct {
	ID  uint8 // APIC ID (xAPIC: bits 31:24 of the ID register)
	LDR uint8 // logical APIC ID (bits 31:24 of the LDR)
	DFR uint8 // destination format model (bits 31:28 of the DFR)
}

// ResetView is a local APIC's view after reset: APIC ID id, LDR 0, flat model.
func ResetView(id int) View { return View{ID: uint8(id), DFR: flatModel} }

// matches reports whether a message without shorthand addresses v.
func (v View) matches(m Message) bool {
	if m.Dest == BroadcastID {
		return true
	}
	if !m.Logical {
		return v.ID == m.Dest
	}
	if v.DFR == clusterModel {
		return v.LDR>>4 == m.Dest>>4 && v.LDR&m.Dest&0xF != 0
	}
	return v.LDR&m.Dest != 0
}

// Targets returns the vCPUs (indexes into views) a message is for. A
// lowest-priority message goes to one of its matches: the lowest-numbered
// (no priority arbitration; allowed, since the choice is the platform's).
func Targets(m Message, views []View) []int {
	var out []int
	switch m.Shorthand {
	case Self:
		if m.Source >= 0 && m.Source < len(views) {
			out = append(out, m.Source)
		}
		return out
	case AllInclSelf, AllExclSelf:
		for i := range views {
			if m.Shorthand == AllExclSelf && i == m.Source {
				continue
			}
			out = append(out, i)
		}
	default:
		for i, v := range views {
			if v.matches(m) {
				out = append(out, i)
			}
		}
	}
	if m.Mode == LowestPriority && len(out) > 1 {
		out = out[:1]
	}
	return out
}
