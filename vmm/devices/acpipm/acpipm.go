// Package acpipm emulates the ACPI fixed-hardware power-management registers
// the FADT points at — the PM1a event block (status and enable), the PM1a
// control block, and the reset register — so the guest can power off (S5)
// and reboot through ACPI.
//
// hpcvm uses full ACPI, not hardware-reduced ACPI: in hardware-reduced mode
// Linux drops the legacy PIC and the ISA IRQ mappings the serial port and
// command-line virtio-mmio devices depend on (docs/boot.md).
package acpipm

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// Register the device at layout.ACPIPM1aEventPort with size Size: it spans
// the event block, the control block and the reset register.
const (
	Size       = layout.ACPIResetPort - layout.ACPIPM1aEventPort + 1
	offStatus  = 0 // PM1_STS, 16 bits
	offEnable  = 2 // PM1_EN, 16 bits
	offControl = layout.ACPIPM1aControlPort - layout.ACPIPM1aEventPort
	offReset   = layout.ACPIResetPort - layout.ACPIPM1aEventPort

	sciEnable  = 1 << 0  // PM1_CNT.SCI_EN: always set, the machine is always in ACPI mode
	slpTypeSh  = 10      // PM1_CNT.SLP_TYP, bits 10-12
	slpEnable  = 1 << 13 // PM1_CNT.SLP_EN
	wakeStatus = 1 << 15 // PM1_STS.WAK_STS
)

// PM holds the registers and the VMM's callbacks.
type PM struct {
	onPowerOff func()
	onReset    func()
	log        *slog.Logger

	mu      sync.Mutex
	status  uint16
	enable  uint16
	control uint16
}

var _ bus.Device = (*PM)(nil)

// New returns the registers. The callbacks run on the vCPU thread and must
// not block (signal the VMM's main loop instead).
func New(onPowerOff, onReset func(), log *slog.Logger) *PM {
	if log == nil {
		log = slog.Default()
	}
	return &PM{onPowerOff: onPowerOff, onReset: onReset, log: log, control: sciEnable}
}

// reg16 returns a pointer to the 16-bit register containing offset and the
// byte position inside it.
func (p *PM) reg16(offset uint64) (*uint16, uint64) {
	switch {
	case offset < offEnable:
		return &p.status, offset - offStatus
	case offset < offEnable+2:
		return &p.enable, offset - offEnable
	case offset >= offControl && offset < offControl+2:
		return &p.control, offset - offControl
	}
	return nil, 0
}

// Read implements bus.Device.
func (p *PM) Read(offset uint64, data []byte) {
	clear(data)
	p.mu.Lock()
	defer p.mu.Unlock()
	r, pos := p.reg16(offset)
	if r == nil {
		return
	}
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], *r)
	copy(data, b[pos:])
}

// Write implements bus.Device.
func (p *PM) Write(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	if offset == offReset {
		if data[0] != layout.ACPIResetValue {
			p.log.Debug("acpipm: ignoring reset register value", "value", data[0])
			return
		}
		p.log.Info("acpipm: guest requested a reset")
		if p.onReset != nil {
			p.onReset()
		}
		return
	}
	p.mu.Lock()
	r, pos := p.reg16(offset)
	if r == nil {
		p.mu.Unlock()
		return
	}
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], *r)
	old := *r
	n := copy(b[pos:], data)
	v := binary.LittleEndian.Uint16(b[:])
	var powerOff bool
	switch r {
	case &p.status:
		// Write-one-to-clear: only the bytes written count.
		mask := uint16(0xff) << (8 * pos)
		if n == 2 {
			mask = 0xffff
		}
		p.status = old &^ (v & mask)
	case &p.enable:
		p.enable = v
	case &p.control:
		p.control = v&^slpEnable | sciEnable // SLP_EN reads as 0; SCI_EN is fixed
		if v&slpEnable != 0 {
			typ := v >> slpTypeSh & 7
			if typ == layout.ACPIS5SleepType {
				powerOff = true
			} else {
				p.log.Warn("acpipm: ignoring unsupported sleep state", "slp_typ", typ)
			}
		}
	}
	p.mu.Unlock()
	if powerOff {
		p.log.Info("acpipm: guest requested power off (S5)")
		if p.onPowerOff != nil {
			p.onPowerOff()
		}
	}
}

// SetWake sets WAK_STS, for a VMM that resumes the guest from a sleep state.
func (p *PM) SetWake() {
	p.mu.Lock()
	p.status |= wakeStatus
	p.mu.Unlock()
}

// StateVersion is the current version of State.
const StateVersion = 2

// State is the register state (version 2: PM1 fixed-hardware registers).
type State struct {
	Version uint32
	Status  uint16
	Enable  uint16
	Control uint16
}

// State captures the registers.
func (p *PM) State() State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return State{Version: StateVersion, Status: p.status, Enable: p.enable, Control: p.control}
}

// Restore loads s.
func (p *PM) Restore(s State) error {
	if s.Version != StateVersion {
		return fmt.Errorf("acpipm state version %d, this hpcvm reads version %d", s.Version, StateVersion)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.status, p.enable, p.control = s.Status, s.Enable, s.Control|sciEnable
	return nil
}
