package virtio

import "fmt"

// StateVersion is the current version of State.
const StateVersion = 1

// QueueState is one virtqueue's transport registers and ring positions.
type QueueState struct {
	Size       uint16
	Ready      bool
	DescAddr   uint64
	DriverAddr uint64 // available ring
	DeviceAddr uint64 // used ring
	LastAvail  uint16 // next available-ring entry the device will consume
	NextUsed   uint16 // next used-ring entry the device will fill
}

// State is the virtio-mmio transport state (version 1). Device-specific
// state is saved separately by each device.
type State struct {
	Version           uint32
	DeviceType        uint32
	Status            uint32
	DeviceFeaturesSel uint32
	DriverFeaturesSel uint32
	DriverFeatures    uint64
	QueueSel          uint32
	InterruptStatus   uint32
	ConfigGeneration  uint32
	NeedsReset        bool
	Queues            []QueueState
}

// State captures the transport. For a consistent snapshot the vCPUs must be
// stopped and the device idle (no chain popped but not yet pushed).
func (m *MMIO) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := State{
		Version:           StateVersion,
		DeviceType:        m.dev.Type(),
		Status:            m.status,
		DeviceFeaturesSel: m.devFeaturesSel,
		DriverFeaturesSel: m.drvFeaturesSel,
		DriverFeatures:    m.driverFeatures,
		QueueSel:          m.queueSel,
		InterruptStatus:   m.intStatus.Load(),
		ConfigGeneration:  m.configGen.Load(),
		NeedsReset:        m.needsReset.Load(),
		Queues:            make([]QueueState, len(m.queues)),
	}
	for i, c := range m.queues {
		qs := QueueState{Size: c.size, Ready: c.ready, DescAddr: c.desc, DriverAddr: c.driver, DeviceAddr: c.device}
		if m.active != nil && m.active[i] != nil {
			qs.LastAvail, qs.NextUsed = m.active[i].Indices()
		}
		s.Queues[i] = qs
	}
	return s
}

// Restore loads s into a transport that has not been activated, and
// re-activates the device if the driver had set DRIVER_OK. The device's own
// state must be restored first.
func (m *MMIO) Restore(s State) error {
	if s.Version != StateVersion {
		return fmt.Errorf("virtio-mmio state version %d, want %d", s.Version, StateVersion)
	}
	if s.DeviceType != m.dev.Type() {
		return fmt.Errorf("virtio-mmio state is for device type %d, this device is type %d", s.DeviceType, m.dev.Type())
	}
	if len(s.Queues) != len(m.queues) {
		return fmt.Errorf("virtio-mmio state has %d queues, device has %d", len(s.Queues), len(m.queues))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.resetLocked()
	m.status = s.Status
	m.devFeaturesSel, m.drvFeaturesSel = s.DeviceFeaturesSel, s.DriverFeaturesSel
	m.driverFeatures, m.queueSel = s.DriverFeatures, s.QueueSel
	m.configGen.Store(s.ConfigGeneration)
	m.needsReset.Store(s.NeedsReset)
	for i, q := range s.Queues {
		m.queues[i] = queueConfig{size: q.Size, ready: q.Ready, desc: q.DescAddr, driver: q.DriverAddr, device: q.DeviceAddr}
	}
	if s.Status&StatusDriverOK != 0 && !s.NeedsReset {
		if err := m.activateLocked(s.Queues); err != nil {
			return fmt.Errorf("virtio-mmio restore: reactivate device: %w", err)
		}
	}
	if s.InterruptStatus != 0 {
		// The edge that announced these bits may have been lost with the
		// old VM; deliver one so the driver looks.
		m.intStatus.Store(s.InterruptStatus)
		if err := m.irq.Trigger(); err != nil {
			return fmt.Errorf("virtio-mmio restore: interrupt: %w", err)
		}
	}
	return nil
}
