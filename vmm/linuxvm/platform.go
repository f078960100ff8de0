package linuxvm

import (
	"fmt"
	"os"

	"github.com/hpcvm/hpcvm/vmm/devices/acpipm"
	"github.com/hpcvm/hpcvm/vmm/devices/i8042"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio/vsock"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// attachPlatform wires the ACPI sleep/reset registers (guest poweroff and
// reboot), the i8042 reset line (reboot=k) and vsock.
func attachPlatform(p platform, d *devices, cfg *Config) error {
	pm := acpipm.New(p.poweroff, p.reset, cfg.Logger)
	if err := p.io.Register("acpi-pm", layout.ACPIPM1aEventPort, acpipm.Size, pm); err != nil {
		return err
	}
	data, cmd := i8042.New(p.reset, cfg.Logger).Ports()
	if err := p.io.Register("i8042-data", layout.I8042DataPort, 1, data); err != nil {
		return err
	}
	if err := p.io.Register("i8042-cmd", layout.I8042CommandPort, 1, cmd); err != nil {
		return err
	}
	return attachVsock(p, d, cfg)
}

// attachVsock adds the virtio-vsock device with its hybrid Unix-socket
// backend. It is the virtio device after the disks (see Run's cmdline).
func attachVsock(p platform, d *devices, cfg *Config) error {
	if cfg.VsockPath == "" {
		return nil
	}
	if st, err := os.Lstat(cfg.VsockPath); err == nil && st.Mode()&os.ModeSocket != 0 {
		os.Remove(cfg.VsockPath) // stale socket of an earlier run (Validate checked it is a socket)
	}
	dev, err := vsock.New(vsock.Config{Path: cfg.VsockPath, GuestCID: uint64(cfg.VsockCID),
		ConnectTimeout: cfg.VsockConnectTimeout, Log: cfg.Logger})
	if err != nil {
		return fmt.Errorf("--vsock %s: %w", cfg.VsockPath, err)
	}
	idx := len(cfg.Disks)
	irq, err := p.irq(layout.VirtioIRQ(idx))
	if err != nil {
		dev.Close()
		return err
	}
	t := virtio.NewMMIO(dev, p.mem, irq, cfg.Logger)
	d.closers = append(d.closers, t)
	return p.mmio.Register("virtio-vsock", layout.VirtioMMIOAddr(idx), layout.VirtioMMIOSize, t)
}
