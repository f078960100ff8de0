package linuxvm

import (
	"github.com/hpcvm/hpcvm/vmm/devices/acpipm"
	"github.com/hpcvm/hpcvm/vmm/devices/i8042"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/machine"
)

// attachPlatform wires the ACPI sleep/reset registers (guest poweroff and
// reboot), the i8042 reset line (reboot=k) and vsock.
func attachPlatform(m *machine.Machine, d *devices, cfg *Config) error {
	poweroff := func() { m.Stop(machine.ExitPoweroff, "guest powered off", nil) }
	reset := func() { m.Stop(machine.ExitReset, "guest requested a reset (reboot)", nil) }
	pm := acpipm.New(poweroff, reset, cfg.Logger)
	if err := m.IO.Register("acpi-pm", layout.ACPISleepControlPort, acpipm.Size, pm); err != nil {
		return err
	}
	data, cmd := i8042.New(reset, cfg.Logger).Ports()
	if err := m.IO.Register("i8042-data", layout.I8042DataPort, 1, data); err != nil {
		return err
	}
	if err := m.IO.Register("i8042-cmd", layout.I8042CommandPort, 1, cmd); err != nil {
		return err
	}
	return attachVsock(m, d, cfg)
}

// attachVsock is filled in when the vsock device lands.
func attachVsock(m *machine.Machine, d *devices, cfg *Config) error { return nil }
