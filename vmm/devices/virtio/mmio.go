package virtio

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// virtio-mmio register offsets (virtio 1.x §4.2.2).
const (
	regMagic             = 0x000
	regVersion           = 0x004
	regDeviceID          = 0x008
	regVendorID          = 0x00c
	regDeviceFeatures    = 0x010
	regDeviceFeaturesSel = 0x014
	regDriverFeatures    = 0x020
	regDriverFeaturesSel = 0x024
	regQueueSel          = 0x030
	regQueueNumMax       = 0x034
	regQueueNum          = 0x038
	regQueueReady        = 0x044
	regQueueNotify       = 0x050
	regInterruptStatus   = 0x060
	regInterruptACK      = 0x064
	regStatus            = 0x070
	regQueueDescLow      = 0x080
	regQueueDescHigh     = 0x084
	regQueueDriverLow    = 0x090
	regQueueDriverHigh   = 0x094
	regQueueDeviceLow    = 0x0a0
	regQueueDeviceHigh   = 0x0a4
	regSHMSel            = 0x0ac
	regSHMLenLow         = 0x0b0
	regSHMLenHigh        = 0x0b4
	regSHMBaseLow        = 0x0b8
	regSHMBaseHigh       = 0x0bc
	regConfigGeneration  = 0x0fc
	regConfig            = 0x100

	mmioMagic   = 0x74726976 // "virt"
	mmioVersion = 2
)

// MMIO is a virtio-mmio version 2 transport for one device. It implements
// bus.Device; register it on the MMIO bus at layout.VirtioMMIOAddr(i) with
// size layout.VirtioMMIOSize and give it the interrupt for
// layout.VirtioIRQ(i).
type MMIO struct {
	dev  Device
	mem  memory.Guest
	irq  bus.Interrupt
	log  *slog.Logger
	maxs []uint16

	mu             sync.Mutex
	status         uint32
	devFeaturesSel uint32
	drvFeaturesSel uint32
	driverFeatures uint64
	queueSel       uint32
	queues         []queueConfig
	active         []*Queue // non-nil while the device is activated
	closed         bool

	// Touched by device workers without mu (see Env), so atomic.
	intStatus  atomic.Uint32
	configGen  atomic.Uint32
	needsReset atomic.Bool
}

type queueConfig struct {
	size                 uint16
	ready                bool
	desc, driver, device uint64
}

var _ bus.Device = (*MMIO)(nil)

// NewMMIO wraps dev in a virtio-mmio transport over guest memory mem,
// raising irq for used-buffer and config-change notifications.
func NewMMIO(dev Device, mem memory.Guest, irq bus.Interrupt, log *slog.Logger) *MMIO {
	if log == nil {
		log = slog.Default()
	}
	maxs := dev.QueueMaxSizes()
	return &MMIO{
		dev:    dev,
		mem:    mem,
		irq:    irq,
		log:    log.With("virtio", dev.Type()),
		maxs:   maxs,
		queues: make([]queueConfig, len(maxs)),
	}
}

// Device returns the wrapped device.
func (m *MMIO) Device() Device { return m.dev }

func (m *MMIO) offered() uint64 {
	return m.dev.Features() | FeatureVersion1 | FeatureRingIndirectDesc
}

func (m *MMIO) raise(bit uint32) {
	// Interrupt only on a 0->1 transition: while the bit is set the guest's
	// handler has not yet acknowledged, and it re-reads the rings after ACK.
	if m.intStatus.Or(bit)&bit != 0 {
		return
	}
	if err := m.irq.Trigger(); err != nil {
		m.log.Error("virtio interrupt", "err", err)
	}
}

func (m *MMIO) fail() {
	m.needsReset.Store(true)
	m.configChanged()
}

func (m *MMIO) configChanged() {
	m.configGen.Add(1)
	m.raise(InterruptConfigChange)
}

// Read implements bus.Device.
func (m *MMIO) Read(offset uint64, data []byte) {
	if offset >= regConfig {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.dev.ReadConfig(offset-regConfig, data)
		return
	}
	clear(data)
	if len(data) != 4 || offset%4 != 0 {
		m.log.Debug("virtio-mmio: ignoring unaligned register read", "offset", offset, "width", len(data))
		return
	}
	m.mu.Lock()
	v := m.readReg(offset)
	m.mu.Unlock()
	binary.LittleEndian.PutUint32(data, v)
}

func (m *MMIO) selected() (*queueConfig, uint16) {
	if int(m.queueSel) >= len(m.queues) {
		return nil, 0
	}
	return &m.queues[m.queueSel], m.maxs[m.queueSel]
}

func (m *MMIO) readReg(offset uint64) uint32 {
	switch offset {
	case regMagic:
		return mmioMagic
	case regVersion:
		return mmioVersion
	case regDeviceID:
		return m.dev.Type()
	case regVendorID:
		return VendorID
	case regDeviceFeatures:
		if m.devFeaturesSel > 1 {
			return 0
		}
		return uint32(m.offered() >> (32 * m.devFeaturesSel))
	case regQueueNumMax:
		_, max := m.selected()
		return uint32(max)
	case regQueueReady:
		if q, _ := m.selected(); q != nil && q.ready {
			return 1
		}
		return 0
	case regInterruptStatus:
		return m.intStatus.Load()
	case regStatus:
		s := m.status
		if m.needsReset.Load() {
			s |= StatusDeviceNeedsReset
		}
		return s
	case regSHMLenLow, regSHMLenHigh, regSHMBaseLow, regSHMBaseHigh:
		return 0xffffffff // no shared memory regions
	case regConfigGeneration:
		return m.configGen.Load()
	}
	m.log.Debug("virtio-mmio: read of write-only or unknown register", "offset", offset)
	return 0
}

// Write implements bus.Device.
func (m *MMIO) Write(offset uint64, data []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if offset >= regConfig {
		m.dev.WriteConfig(offset-regConfig, data)
		return
	}
	if len(data) != 4 || offset%4 != 0 {
		m.log.Debug("virtio-mmio: ignoring unaligned register write", "offset", offset, "width", len(data))
		return
	}
	v := binary.LittleEndian.Uint32(data)
	switch offset {
	case regDeviceFeaturesSel:
		m.devFeaturesSel = v
	case regDriverFeatures:
		if m.status&StatusFeaturesOK != 0 || m.drvFeaturesSel > 1 {
			return
		}
		shift := 32 * m.drvFeaturesSel
		m.driverFeatures = m.driverFeatures&^(0xffffffff<<shift) | uint64(v)<<shift
	case regDriverFeaturesSel:
		m.drvFeaturesSel = v
	case regQueueSel:
		m.queueSel = v
	case regQueueNotify:
		m.notifyLocked(int(v & 0xffff))
	case regInterruptACK:
		m.intStatus.And(^v)
	case regStatus:
		m.writeStatus(v)
	case regSHMSel:
	case regQueueNum, regQueueReady, regQueueDescLow, regQueueDescHigh,
		regQueueDriverLow, regQueueDriverHigh, regQueueDeviceLow, regQueueDeviceHigh:
		m.writeQueueReg(offset, v)
	default:
		m.log.Debug("virtio-mmio: write to read-only or unknown register", "offset", offset)
	}
}

func setLow(x *uint64, v uint32)  { *x = *x&^0xffffffff | uint64(v) }
func setHigh(x *uint64, v uint32) { *x = *x&0xffffffff | uint64(v)<<32 }

func (m *MMIO) writeQueueReg(offset uint64, v uint32) {
	q, _ := m.selected()
	if q == nil {
		m.log.Debug("virtio-mmio: queue register write with no such queue selected", "queue", m.queueSel)
		return
	}
	if m.status&StatusDriverOK != 0 {
		m.log.Warn("virtio-mmio: queue reconfiguration after DRIVER_OK ignored", "queue", m.queueSel, "offset", offset)
		return
	}
	if offset == regQueueReady {
		q.ready = v&1 != 0
		return
	}
	if q.ready {
		m.log.Warn("virtio-mmio: write to an enabled queue's configuration ignored", "queue", m.queueSel, "offset", offset)
		return
	}
	switch offset {
	case regQueueNum:
		q.size = uint16(v)
	case regQueueDescLow:
		setLow(&q.desc, v)
	case regQueueDescHigh:
		setHigh(&q.desc, v)
	case regQueueDriverLow:
		setLow(&q.driver, v)
	case regQueueDriverHigh:
		setHigh(&q.driver, v)
	case regQueueDeviceLow:
		setLow(&q.device, v)
	case regQueueDeviceHigh:
		setHigh(&q.device, v)
	}
}

func (m *MMIO) writeStatus(v uint32) {
	if v == 0 {
		m.resetLocked()
		return
	}
	v &^= StatusDeviceNeedsReset // device-owned bit
	old := m.status
	if v&StatusFeaturesOK != 0 && old&StatusFeaturesOK == 0 {
		if err := m.checkFeatures(); err != nil {
			m.log.Warn("virtio-mmio: refusing FEATURES_OK", "err", err)
			v &^= StatusFeaturesOK
		}
	}
	m.status = v
	if v&StatusDriverOK != 0 && old&StatusDriverOK == 0 {
		if v&StatusFeaturesOK == 0 {
			m.log.Warn("virtio-mmio: DRIVER_OK without FEATURES_OK")
			m.needsReset.Store(true)
			return
		}
		if err := m.activateLocked(nil); err != nil {
			m.log.Error("virtio-mmio: activation failed", "err", err)
			m.fail()
		}
	}
}

func (m *MMIO) checkFeatures() error {
	if extra := m.driverFeatures &^ m.offered(); extra != 0 {
		return fmt.Errorf("driver accepted features %#x the device did not offer", extra)
	}
	if m.driverFeatures&FeatureVersion1 == 0 {
		return fmt.Errorf("driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)")
	}
	return nil
}

// activateLocked builds the enabled queues and starts the device. idx, when
// non-nil, restores each queue's ring positions.
func (m *MMIO) activateLocked(idx []QueueState) error {
	if m.closed {
		return fmt.Errorf("device is closed")
	}
	qs := make([]*Queue, len(m.queues))
	enabled := false
	for i, c := range m.queues {
		if !c.ready {
			continue
		}
		switch {
		case c.size == 0 || c.size > m.maxs[i] || c.size&(c.size-1) != 0:
			return fmt.Errorf("queue %d: size %d is not a power of two in [1, %d]", i, c.size, m.maxs[i])
		case c.desc%16 != 0 || c.driver%2 != 0 || c.device%4 != 0:
			return fmt.Errorf("queue %d: misaligned rings desc=%#x driver=%#x device=%#x", i, c.desc, c.driver, c.device)
		}
		qs[i] = NewQueue(m.mem, c.size, c.desc, c.driver, c.device,
			m.driverFeatures&FeatureRingIndirectDesc != 0,
			func() { m.raise(InterruptUsedBuffer) })
		if idx != nil {
			qs[i].SetIndices(idx[i].LastAvail, idx[i].NextUsed)
		}
		enabled = true
	}
	if !enabled {
		return fmt.Errorf("no queue enabled")
	}
	env := &Env{Mem: m.mem, Features: m.driverFeatures, Queues: qs, Log: m.log, t: m}
	if err := m.dev.Activate(env); err != nil {
		return err
	}
	m.active = qs
	return nil
}

func (m *MMIO) resetLocked() {
	if m.active != nil {
		m.dev.Reset()
		m.active = nil
	}
	m.status = 0
	m.devFeaturesSel, m.drvFeaturesSel, m.driverFeatures, m.queueSel = 0, 0, 0, 0
	clear(m.queues)
	m.intStatus.Store(0)
	m.needsReset.Store(false)
}

// NotifyQueue delivers a driver kick for queue q, exactly as a guest write
// of q to QueueNotify would. The VMM calls it from an ioeventfd handler.
func (m *MMIO) NotifyQueue(q int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.notifyLocked(q)
}

func (m *MMIO) notifyLocked(q int) {
	if m.active == nil || m.needsReset.Load() {
		return
	}
	if q < 0 || q >= len(m.active) || m.active[q] == nil {
		m.log.Debug("virtio-mmio: kick for a queue that is not enabled", "queue", q)
		return
	}
	m.dev.Notify(q)
}

// Close stops the device's workers and releases its backend.
func (m *MMIO) Close() error {
	m.mu.Lock()
	if m.active != nil {
		m.dev.Reset()
		m.active = nil
	}
	m.closed = true
	m.mu.Unlock()
	return m.dev.Close()
}

// KernelCmdline returns the kernel command-line fragment that tells Linux
// about virtio-mmio device i, e.g. "virtio_mmio.device=4K@0xd0000000:5".
func KernelCmdline(i int) string {
	size := fmt.Sprintf("%d", layout.VirtioMMIOSize)
	if layout.VirtioMMIOSize%1024 == 0 {
		size = fmt.Sprintf("%dK", layout.VirtioMMIOSize/1024)
	}
	return fmt.Sprintf("virtio_mmio.device=%s@%#x:%d", size, layout.VirtioMMIOAddr(i), layout.VirtioIRQ(i))
}
