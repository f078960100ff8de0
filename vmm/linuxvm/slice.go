package linuxvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"

	"github.com/hpcvm/hpcvm/internal/units"
	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/dsm"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// SliceConfig is one slice of a Linux VM spread over several VMM processes
// (docs/dsm.md). VM describes the whole VM; its CPUs come from Placement.
// Only slice 0 (the home: kernel loading and every device) uses VM's
// Kernel, Initrd, Cmdline, Disks, Vsock and Console; the other slices run
// vCPUs and serve guest pages.
type SliceConfig struct {
	VM        Config
	Transport dsm.TransportConfig
	Placement [][]int
}

// RunSlice runs one slice until the guest powers off or resets (on every
// slice at once), a slice fails, or ctx ends.
func RunSlice(ctx context.Context, sc SliceConfig) (dsm.SliceResult, error) {
	cfg := sc.VM
	ncpu, err := dsm.CheckPlacement(sc.Placement, len(sc.Transport.Addrs))
	if err != nil {
		return dsm.SliceResult{}, fmt.Errorf("placement: %w", err)
	}
	if len(sc.Placement[0]) == 0 || !slices.Contains(sc.Placement[0], 0) {
		// The boot processor starts at the kernel entry the loader
		// computed, which only slice 0 has.
		return dsm.SliceResult{}, errors.New("placement: vCPU 0 (the boot processor) must be on slice 0")
	}
	cfg.CPUs = ncpu
	if sc.Transport.ID == 0 {
		if err := cfg.Validate(); err != nil {
			return dsm.SliceResult{}, err
		}
	} else if cfg.MemBytes < MinMemBytes || cfg.MemBytes%memory.PageSize != 0 {
		return dsm.SliceResult{}, fmt.Errorf("--mem %s: need at least %s, in whole pages", units.FormatSize(cfg.MemBytes), units.FormatSize(MinMemBytes))
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	// No 8259 pair: the slices emulate the local APICs and the IOAPIC.
	legacy := legacyDevices
	legacy.NoPIC = true
	console := &panicWatch{w: cfg.Console}
	var devs *devices
	defer func() {
		if devs != nil {
			devs.Close()
		}
	}()
	res, err := dsm.RunSlice(ctx, dsm.SliceConfig{
		Transport: sc.Transport,
		Placement: sc.Placement,
		MemBytes:  cfg.MemBytes,
		Loader:    newLoader(&cfg, legacy),
		Setup: func(h *dsm.Home) error {
			p := platform{io: &h.Machine.IO, mmio: &h.Machine.MMIO, mem: h.Memory,
				irq:      func(gsi uint32) (bus.Interrupt, error) { return h.IOAPIC.Line(int(gsi)), nil },
				poweroff: func() { h.Stop(machine.ExitPoweroff, "guest powered off") },
				reset:    func() { h.Stop(machine.ExitReset, "guest requested a reset (reboot)") }}
			var err error
			devs, err = attachDevices(p, &cfg, console)
			return err
		},
		Logger: cfg.Logger,
	})
	if res.Exit.Kind == machine.ExitReset && console.seen {
		res.Exit.Kind = machine.ExitPanic
		res.Exit.Reason = "guest kernel panic (see console)"
	}
	return res, err
}
