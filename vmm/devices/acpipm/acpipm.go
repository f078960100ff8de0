// Package acpipm emulates the ACPI hardware-reduced sleep control, sleep
// status and reset registers that the FADT points at, so the guest can power
// off (S5) and reboot through ACPI.
package acpipm

import (
	"fmt"
	"log/slog"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// The three byte registers are consecutive ports; register one Device at
// layout.ACPISleepControlPort with size Size.
const (
	Size       = layout.ACPIResetPort - layout.ACPISleepControlPort + 1
	offControl = 0
	offStatus  = layout.ACPISleepStatusPort - layout.ACPISleepControlPort
	offReset   = layout.ACPIResetPort - layout.ACPISleepControlPort

	slpEn     = 1 << 5
	wakStatus = 0x80
)

// PM holds the registers and the VMM's callbacks.
type PM struct {
	onPowerOff func()
	onReset    func()
	log        *slog.Logger

	mu     sync.Mutex
	status byte
}

var _ bus.Device = (*PM)(nil)

// New returns the registers. The callbacks run on the vCPU thread and must
// not block (signal the VMM's main loop instead).
func New(onPowerOff, onReset func(), log *slog.Logger) *PM {
	if log == nil {
		log = slog.Default()
	}
	return &PM{onPowerOff: onPowerOff, onReset: onReset, log: log}
}

// Read implements bus.Device: only the status register has content.
func (p *PM) Read(offset uint64, data []byte) {
	clear(data)
	if len(data) > 0 && offset == offStatus {
		p.mu.Lock()
		data[0] = p.status
		p.mu.Unlock()
	}
}

// Write implements bus.Device.
func (p *PM) Write(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	switch offset {
	case offControl:
		typ := (v >> 2) & 7
		if v&slpEn == 0 {
			return
		}
		if typ != layout.ACPIS5SleepType {
			p.log.Warn("acpipm: ignoring unsupported sleep state", "slp_typ", typ)
			return
		}
		p.log.Info("acpipm: guest requested power off (S5)")
		if p.onPowerOff != nil {
			p.onPowerOff()
		}
	case offStatus:
		p.mu.Lock()
		p.status &^= v // write-one-to-clear
		p.mu.Unlock()
	case offReset:
		if v != layout.ACPIResetValue {
			p.log.Debug("acpipm: ignoring reset register value", "value", v)
			return
		}
		p.log.Info("acpipm: guest requested a reset")
		if p.onReset != nil {
			p.onReset()
		}
	}
}

// SetWake sets WAK_STS, for a VMM that resumes the guest from a sleep state.
func (p *PM) SetWake() {
	p.mu.Lock()
	p.status |= wakStatus
	p.mu.Unlock()
}

// StateVersion is the current version of State.
const StateVersion = 1

// State is the register state (version 1).
type State struct {
	Version     uint32
	SleepStatus byte
}

// State captures the registers.
func (p *PM) State() State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return State{Version: StateVersion, SleepStatus: p.status}
}

// Restore loads s.
func (p *PM) Restore(s State) error {
	if s.Version != StateVersion {
		return fmt.Errorf("acpipm state version %d, want %d", s.Version, StateVersion)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.status = s.SleepStatus
	return nil
}
