package dsm

import (
	"errors"
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

// Device access forwarding: every device lives on slice 0 (the home). A
// vCPU's port I/O or MMIO exit on another slice becomes an io-req to slice
// 0, which performs it on its buses and answers io-reply (with the data
// read); the vCPU resumes only then, so device accesses keep program order
// (port I/O is synchronous on real hardware too). The local APIC window is
// never forwarded: each vCPU's LAPIC is emulated on its own slice.

// lapicWindow reports whether an MMIO address is in the local APIC page.
func lapicWindow(addr uint64) bool {
	return addr >= layout.LAPICAddr && addr < layout.LAPICAddr+0x1000
}

// sliceHooks is the slice's part of every vCPU's run loop.
type sliceHooks struct{ s *sliceRun }

func (h *sliceHooks) BeforeRun(c *kvm.VCPU) error {
	s := h.s
	v := s.irq.local[c.ID()]
	if !v.started {
		v.started = true
		if err := s.startVCPU(c, v); err != nil {
			return err
		}
	}
	if s.sampler != nil {
		if err := s.sampler.record(c, v); err != nil {
			return err
		}
	}
	_, err := s.irq.beforeRun(c, v, s.machine())
	return err
}

func (h *sliceHooks) HandleExit(c *kvm.VCPU, e *kvm.Exit) (bool, error) {
	s := h.s
	if s.cfg.ReplicateKernelTables && s.smpSeen.Load() && monotonicNow() >= s.ktNext.Load() {
		if err := s.classifyKernelTables(c); err != nil {
			return true, err
		}
	}
	switch e.Reason {
	case kvm.ExitIO:
		if e.IOWrite && s.cfg.DonePort != 0 && e.Port == s.cfg.DonePort {
			// The vCPU has finished: perform the write, then park it
			// (a finished micro-guest spins, which costs a host CPU).
			if s.id == 0 {
				s.machine().IO.Write(uint64(e.Port), e.IOData[:e.IOSize])
			} else if err := s.forward(c, SpacePort, uint64(e.Port), true, e.IOSize, e.IOData[:e.IOSize]); err != nil {
				return true, err
			}
			s.machine().Idle(nil)
			return true, nil
		}
		if s.id == 0 || e.IOSize == 0 || len(e.IOData) == 0 {
			return false, nil
		}
		return true, s.forward(c, SpacePort, uint64(e.Port), e.IOWrite, e.IOSize, e.IOData)
	case kvm.ExitMMIO:
		if lapicWindow(e.MMIOAddr) {
			l := s.irq.local[c.ID()].lapic
			if e.MMIOWrite {
				l.Write(e.MMIOAddr-layout.LAPICAddr, e.MMIOData)
			} else {
				l.Read(e.MMIOAddr-layout.LAPICAddr, e.MMIOData)
			}
			return true, nil
		}
		if s.id == 0 {
			return false, nil
		}
		return true, s.forward(c, SpaceMMIO, e.MMIOAddr, e.MMIOWrite, len(e.MMIOData), e.MMIOData)
	case kvm.ExitHLT:
		s.irq.halt(c, s.irq.local[c.ID()], s.machine())
		return true, nil
	case kvm.ExitIRQWindowOpen:
		return true, nil // BeforeRun injects
	case kvm.ExitX86RDMSR, kvm.ExitX86WRMSR:
		return true, s.irq.msr(c, s.irq.local[c.ID()], e.Reason == kvm.ExitX86WRMSR)
	}
	return false, nil
}

// startVCPU runs once on each vCPU's thread before it first enters the
// guest.
func (s *sliceRun) startVCPU(c *kvm.VCPU, v *vcpuIRQ) error {
	khz, err := c.GetTSCKHz()
	if err != nil {
		return err
	}
	v.lapic.SetTSCHz(khz * 1000)
	return s.setGuestTSC(c, khz)
}

// forward performs one access on slice 0 and waits for it; data is the
// vCPU's buffer (filled on reads).
func (s *sliceRun) forward(c *kvm.VCPU, space IOSpace, addr uint64, write bool, size int, data []byte) error {
	req := Msg{Type: MsgIOReq, Addr: addr, VCPU: uint16(c.ID()), Space: space, IOWrite: write,
		Size: uint8(size), Count: uint16(len(data) / size)}
	if write {
		req.Data = data
	}
	if err := checkIOReq(&req); err != nil {
		return fmt.Errorf("vcpu %d: cannot forward: %w", c.ID(), err)
	}
	s.node.Stats.IOForwarded.Add(1)
	rep, err := s.node.Call(0, &req, s.m.Stopping())
	if errors.Is(err, errAborted) {
		return nil // the machine is stopping; the vCPU loop exits next
	}
	if err != nil {
		return err
	}
	want := 0
	if !write {
		want = len(data)
	}
	if len(rep.Data) != want {
		err := fmt.Errorf("%w: slice 0 answered a %d-byte %v access with %d bytes", ErrProtocol, len(data), space, len(rep.Data))
		s.node.fail(err)
		return err
	}
	copy(data, rep.Data)
	return nil
}

func (sp IOSpace) String() string {
	if sp == SpaceMMIO {
		return "MMIO"
	}
	return "port"
}

// serveIO performs a forwarded access on slice 0's buses and replies.
func (s *sliceRun) serveIO(from int, r *Msg) {
	select {
	case <-s.ready:
	case <-s.node.ctx.Done():
		return
	}
	s.mu.Lock()
	m := s.m
	s.mu.Unlock()
	if m == nil {
		return // slice 0 gave up before its machine existed
	}
	if r.Space == SpaceMMIO && lapicWindow(r.Addr) {
		s.node.fail(fmt.Errorf("%w: slice %d forwarded a local APIC access (%#x)", ErrProtocol, from, r.Addr))
		return
	}
	bus := &m.IO
	if r.Space == SpaceMMIO {
		bus = &m.MMIO
	}
	n := int(r.Size) * int(r.Count)
	rep := Msg{Type: MsgIOReply, ReqID: r.ReqID}
	if r.IOWrite {
		for off := 0; off < n; off += int(r.Size) {
			bus.Write(r.Addr, r.Data[off:off+int(r.Size)])
		}
	} else {
		rep.Data = make([]byte, n)
		for off := 0; off < n; off += int(r.Size) {
			bus.Read(r.Addr, rep.Data[off:off+int(r.Size)])
		}
	}
	s.node.Stats.IOServed.Add(1)
	s.node.send(from, &rep)
}

// DescribeAddr is what backs a vCPU's kernel address on this slice, for
// the machine's stop-time report (machine.AddrDescriber).
func (h *sliceHooks) DescribeAddr(cr3, va uint64) string { return h.s.node.DescribeAddr(cr3, va) }

// DescribeVCPU is the interrupt side of a local vCPU for the machine's
// stop-time report (machine.VCPUDescriber).
func (h *sliceHooks) DescribeVCPU(id int) string {
	v := h.s.irq.local[id]
	if v == nil {
		return ""
	}
	return fmt.Sprintf("wait-sipi=%v %s", v.waitSIPI, v.lapic.Describe())
}
