package machine

import (
	"encoding/binary"
	"fmt"
	"os"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"golang.org/x/sys/unix"
)

// irqfdLine raises an edge on an in-kernel irqchip input through KVM_IRQFD:
// one eventfd write, from any thread, with no ioctl on the hot path.
type irqfdLine struct {
	f   *os.File
	gsi uint32
}

func (l *irqfdLine) Trigger() error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 1)
	if _, err := l.f.Write(b[:]); err != nil {
		return fmt.Errorf("irq %d: eventfd write: %w", l.gsi, err)
	}
	return nil
}

// IRQ returns the interrupt line for GSI gsi of the in-kernel irqchip.
// Lines are closed with the machine.
func (m *Machine) IRQ(gsi uint32) (bus.Interrupt, error) {
	if !m.cfg.InKernelIRQChip {
		return nil, fmt.Errorf("irq %d: machine has no in-kernel irqchip", gsi)
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("irq %d: eventfd: %w", gsi, err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("irqfd-%d", gsi))
	if err := m.vm.IRQFD(fd, gsi, false); err != nil {
		f.Close()
		return nil, err
	}
	m.closers = append(m.closers, f)
	return &irqfdLine{f: f, gsi: gsi}, nil
}
