package dsm

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
)

// RIP sampling (SliceConfig.ProfileEvery; docs/dsm.md, "Where a
// distributed Linux spends its time"). Page counters say which pages move;
// they do not say which guest code moves them. Every period the sampler
// asks each local vCPU that is in the guest for its instruction pointer:
// the kick makes KVM_RUN return (from a page fault wait too: the fault is
// retried at the next entry), and the vCPU's own thread records RIP before
// it enters again. A vCPU stalled on a remote page reports the instruction
// that touched it, so on a slow interconnect the profile is mostly a
// profile of the coherence stalls. vCPUs waiting in the VMM (halted, or
// for a startup IPI) are counted, not kicked.

// RIPSample is one guest instruction address and how many samples found a
// vCPU there.
type RIPSample struct {
	RIP     uint64 `json:"rip"`
	Samples int64  `json:"samples"`
	// Symbol is the guest kernel's function containing RIP ("name+0xoff"),
	// when the slice was given a kernel with a symbol table.
	Symbol string `json:"symbol,omitempty"`
}

// RIPProfile is a slice's sampling result.
type RIPProfile struct {
	Every time.Duration `json:"every"`
	// InGuest samples found a vCPU in the guest (or stalled on a page),
	// Idle ones waiting in the VMM.
	InGuest int64 `json:"in_guest"`
	Idle    int64 `json:"idle"`
	// Top are the most sampled addresses, most first.
	Top []RIPSample `json:"top"`
}

type ripSampler struct {
	s     *sliceRun
	every time.Duration

	mu      sync.Mutex
	counts  map[uint64]int64
	inGuest int64
	idle    int64
}

// run samples every period until done closes.
func (p *ripSampler) run(done <-chan struct{}) {
	t := time.NewTicker(p.every)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		for _, id := range p.s.vcpus {
			v := p.s.irq.local[id]
			if v.idle.Load() {
				p.mu.Lock()
				p.idle++
				p.mu.Unlock()
				continue
			}
			if !v.sample.Swap(true) {
				p.s.kick(id)
			}
		}
	}
}

// record is called on the vCPU's thread before an entry: the sample asked
// for, if any.
func (p *ripSampler) record(c *kvm.VCPU, v *vcpuIRQ) error {
	if !v.sample.Swap(false) {
		return nil
	}
	regs, err := c.GetRegs()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.counts[regs.RIP]++
	p.inGuest++
	p.mu.Unlock()
	return nil
}

// profile returns the n most sampled addresses.
func (p *ripSampler) profile(n int) *RIPProfile {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := &RIPProfile{Every: p.every, InGuest: p.inGuest, Idle: p.idle}
	for rip, k := range p.counts {
		out.Top = append(out.Top, RIPSample{RIP: rip, Samples: k})
	}
	slices.SortFunc(out.Top, func(a, b RIPSample) int {
		return cmp.Or(cmp.Compare(b.Samples, a.Samples), cmp.Compare(a.RIP, b.RIP))
	})
	out.Top = out.Top[:min(n, len(out.Top))]
	return out
}
