package linuxvm

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hpcvm/hpcvm/vmm/boot/acpi"
	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/devices/boottimer"
	"github.com/hpcvm/hpcvm/vmm/devices/serial"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio/blk"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// legacyDevices is what the FADT advertises: hpcvm emulates the i8042 only
// for its reset line, and no CMOS RTC (the guest uses kvmclock).
var legacyDevices = acpi.Legacy{I8042: true}

// platform is where a Linux VM's devices attach: a single-node machine, or
// the home slice of a distributed VM (whose guest memory is the coherent
// view and whose interrupt lines are its userspace IOAPIC's).
type platform struct {
	io, mmio *bus.Bus
	mem      memory.Guest
	irq      func(gsi uint32) (bus.Interrupt, error)
	poweroff func()
	reset    func()
}

// machinePlatform is the single-node platform: KVM's in-kernel irqchip.
func machinePlatform(m *machine.Machine) platform {
	return platform{io: &m.IO, mmio: &m.MMIO, mem: m.RAM(), irq: m.IRQ,
		poweroff: func() { m.Stop(machine.ExitPoweroff, "guest powered off", nil) },
		reset:    func() { m.Stop(machine.ExitReset, "guest requested a reset (reboot)", nil) }}
}

// devices are the VM's attached devices, closed together.
type devices struct {
	closers []io.Closer
}

func (d *devices) Close() error {
	var errs []error
	for i := len(d.closers) - 1; i >= 0; i-- {
		if err := d.closers[i].Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// attachDevices creates the VM's devices and registers them on the buses.
// Virtio devices are numbered disks first, then vsock, matching the DSDT
// entries Run gave the loader.
func attachDevices(p platform, cfg *Config, console io.Writer) (*devices, error) {
	d := &devices{}
	ok := false
	defer func() {
		if !ok {
			d.Close()
		}
	}()
	log := cfg.Logger

	irq, err := p.irq(layout.COM1IRQ)
	if err != nil {
		return nil, err
	}
	uart := serial.New(console, irq, log)
	d.closers = append(d.closers, uart)
	if err := p.io.Register("serial", layout.COM1Port, 8, uart); err != nil {
		return nil, err
	}
	if cfg.ConsoleIn != nil {
		go uart.Pump(cfg.ConsoleIn)
	}

	start := time.Now()
	timer := boottimer.New(start, func(d time.Duration) {
		log.Info("guest reached userspace", "after", d)
		if cfg.OnUserspace != nil {
			cfg.OnUserspace(d.String())
		}
	}, log)
	if err := p.mmio.Register("boot-timer", layout.BootTimerAddr, layout.BootTimerSize, timer); err != nil {
		return nil, err
	}

	next := 0
	addVirtio := func(name string, dev virtio.Device) error {
		irq, err := p.irq(layout.VirtioIRQ(next))
		if err != nil {
			return err
		}
		t := virtio.NewMMIO(dev, p.mem, irq, log)
		d.closers = append(d.closers, t)
		if err := p.mmio.Register(name, layout.VirtioMMIOAddr(next), layout.VirtioMMIOSize, t); err != nil {
			return err
		}
		next++
		return nil
	}
	for i, disk := range cfg.Disks {
		b, err := blk.New(blk.Config{Path: disk.Path, ReadOnly: disk.ReadOnly, Overlay: disk.Overlay, ID: fmt.Sprintf("hpcvm-disk%d", i), Log: log})
		if err != nil {
			return nil, fmt.Errorf("--disk %s: %w", disk.Path, err)
		}
		if err := addVirtio(fmt.Sprintf("virtio-blk%d", i), b); err != nil {
			b.Close()
			return nil, err
		}
	}
	if err := attachPlatform(p, d, cfg); err != nil {
		return nil, err
	}
	ok = true
	return d, nil
}
