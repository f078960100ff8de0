package boot

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// TestKVMBoot enters a real kernel on /dev/kvm with only a polled serial
// port and checks it prints its banner: the register state, page tables,
// GDT and boot information are what Linux expects. Set
// HPCVM_TEST_BZIMAGE and/or HPCVM_TEST_VMLINUX to run it.
func TestKVMBoot(t *testing.T) {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
	ran := false
	for _, env := range []string{"HPCVM_TEST_BZIMAGE", "HPCVM_TEST_VMLINUX"} {
		path := os.Getenv(env)
		if path == "" {
			continue
		}
		ran = true
		t.Run(env, func(t *testing.T) { kvmBoot(t, path) })
	}
	if !ran {
		t.Skip("set HPCVM_TEST_BZIMAGE or HPCVM_TEST_VMLINUX to a real kernel")
	}
}

func kvmBoot(t *testing.T, path string) {
	const ramSize = 256 << 20
	sys, err := kvm.Open()
	if err != nil {
		t.Skip(err)
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.SetTSSAddr(0xfffbd000); err != nil {
		t.Fatal(err)
	}
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	if err := vm.CreatePIT2(); err != nil {
		t.Fatal(err)
	}
	ram, err := memory.NewRAM(ramSize, layout.MMIOGapStart)
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close()
	for i, r := range ram.Regions() {
		if err := vm.SetMemoryRegion(uint32(i), 0, r.GPA, uint64(len(r.Host)), hostAddr(r.Host)); err != nil {
			t.Fatal(err)
		}
	}
	e, err := Load(ram, Config{KernelPath: path, Cmdline: "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 noapictimer", RAM: RAMRegions(ramSize), CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer cpu.Close()
	ids, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetCPUID(ids); err != nil {
		t.Fatal(err)
	}
	regs, err := cpu.GetRegs()
	if err != nil {
		t.Fatal(err)
	}
	sregs, err := cpu.GetSregs()
	if err != nil {
		t.Fatal(err)
	}
	e.SetupRegisters(&regs, &sregs)
	if err := cpu.SetRegs(regs); err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetSregs(sregs); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cpu.LockThread()
	defer cpu.UnlockThread()
	// A guest that spins without exiting is stopped by a kick.
	limit := 90 * time.Second
	if v, err := time.ParseDuration(os.Getenv("HPCVM_TEST_BOOT_TIMEOUT")); err == nil {
		limit = v
	}
	stop := time.AfterFunc(limit, cpu.Kick)
	defer stop.Stop()
	for !bannerDone(out.String()) {
		ex, err := cpu.Run()
		if errors.Is(err, kvm.ErrInterrupted) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch ex.Reason {
		case kvm.ExitIO:
			switch {
			case ex.Port == layout.COM1Port && ex.IOWrite:
				out.Write(ex.IOData)
			case ex.Port == layout.COM1Port+5 && !ex.IOWrite:
				for i := range ex.IOData {
					ex.IOData[i] = 0x60 // transmitter empty
				}
			case !ex.IOWrite:
				for i := range ex.IOData {
					ex.IOData[i] = 0xff
				}
			}
		case kvm.ExitMMIO:
			if !ex.MMIOWrite {
				for i := range ex.MMIOData {
					ex.MMIOData[i] = 0xff
				}
			}
		case kvm.ExitHLT:
			t.Fatalf("guest halted; console:\n%s", out.String())
		default:
			r, _ := cpu.GetRegs()
			t.Fatalf("exit %v (%+v) at RIP %#x; console:\n%s", ex.Reason, ex, r.RIP, out.String())
		}
	}
	if !bannerDone(out.String()) {
		r, _ := cpu.GetRegs()
		t.Fatalf("no banner after %v (RIP %#x); console:\n%s", limit, r.RIP, out.String())
	}
	t.Logf("%s: %s", path, strings.SplitN(out.String()[strings.Index(out.String(), "Linux version"):], "\n", 2)[0])
}

// bannerDone reports whether the whole "Linux version ..." line is out.
func bannerDone(s string) bool {
	i := strings.Index(s, "Linux version")
	return i >= 0 && strings.Contains(s[i:], "\n")
}
