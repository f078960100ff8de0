package dsm

import (
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/microguest"
)

// TestRIPProfileFindsGuestCode samples two slices running the locked
// increment micro-guest: every sampled address must lie in the guest's
// code (a vCPU kicked out of the guest, or out of a page fault wait, is
// at an instruction of its program), and the samples must add up.
func TestRIPProfileFindsGuestCode(t *testing.T) {
	const iters = 4000000 // tens of 1 ms samples even on a fast host
	code := mustProgram("lockinc").Build(iters)
	r := runInProcessWith(t, 2, 2, "lockinc", iters, func(_ int, cfg *SliceConfig) { cfg.ProfileEvery = time.Millisecond })
	for i, p := range r.profile {
		if p == nil {
			t.Fatalf("slice %d returned no profile", i)
		}
		if p.InGuest == 0 {
			t.Errorf("slice %d: no sample found its vCPU in the guest in %v: %+v", i, r.elapsed, p)
		}
		var sum int64
		for _, s := range p.Top {
			sum += s.Samples
			if s.RIP < microguest.CodeAddr || s.RIP >= microguest.CodeAddr+uint64(len(code)) {
				t.Errorf("slice %d: sample at %#x, outside the guest's code [%#x, %#x)", i, s.RIP,
					microguest.CodeAddr, microguest.CodeAddr+len(code))
			}
		}
		if len(p.Top) < 30 && sum != p.InGuest {
			t.Errorf("slice %d: top addresses hold %d samples, want all %d", i, sum, p.InGuest)
		}
		t.Logf("slice %d: %d samples in the guest, %d idle, top %+v", i, p.InGuest, p.Idle, p.Top[:min(3, len(p.Top))])
	}
}
