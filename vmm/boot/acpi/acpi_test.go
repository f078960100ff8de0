package acpi

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/boot/internal/testmem"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

var le = binary.LittleEndian

// findRSDP scans the BIOS area the way Linux does when it is not told
// the RSDP's address: 16-byte steps over 0xE0000-0xFFFFF, signature and
// checksum of the first 20 bytes.
func findRSDP(t *testing.T, mem *testmem.Mem) uint64 {
	t.Helper()
	for a := uint64(0xe0000); a < 0x100000; a += 16 {
		b := mem.Bytes(a, 20)
		if string(b[:8]) == "RSD PTR " && Checksum(b) == 0 {
			return a
		}
	}
	t.Fatal("no RSDP found scanning 0xE0000-0xFFFFF")
	return 0
}

// sdt reads and validates the table at addr.
func sdt(t *testing.T, mem *testmem.Mem, addr uint64, sig string) []byte {
	t.Helper()
	h := mem.Bytes(addr, headerSize)
	if string(h[:4]) != sig {
		t.Fatalf("table at %#x is %q, want %q", addr, h[:4], sig)
	}
	b := mem.Bytes(addr, int(le.Uint32(h[4:])))
	if Checksum(b) != 0 {
		t.Errorf("%s checksum wrong", sig)
	}
	return b
}

// tables follows RSDP -> XSDT and returns every table by signature; it
// also checks the RSDT lists the same tables.
func tables(t *testing.T, mem *testmem.Mem) map[string][]byte {
	t.Helper()
	rp := findRSDP(t, mem)
	r := mem.Bytes(rp, rsdpSize)
	if r[15] != 2 || le.Uint32(r[20:]) != rsdpSize || Checksum(r) != 0 {
		t.Fatalf("RSDP revision %d length %d extended checksum %#x", r[15], le.Uint32(r[20:]), Checksum(r))
	}
	x := sdt(t, mem, le.Uint64(r[24:]), "XSDT")
	rs := sdt(t, mem, uint64(le.Uint32(r[16:])), "RSDT")
	got := map[string][]byte{"XSDT": x, "RSDT": rs}
	n := (len(x) - headerSize) / 8
	if (len(rs)-headerSize)/4 != n {
		t.Errorf("XSDT lists %d tables, RSDT %d", n, (len(rs)-headerSize)/4)
	}
	for i := range n {
		a := le.Uint64(x[headerSize+8*i:])
		if a32 := le.Uint32(rs[headerSize+4*i:]); uint64(a32) != a {
			t.Errorf("XSDT entry %d %#x, RSDT %#x", i, a, a32)
		}
		sig := string(mem.Bytes(a, 4))
		got[sig] = sdt(t, mem, a, sig)
	}
	f := got["FACP"]
	if f == nil {
		t.Fatal("no FADT")
	}
	got["DSDT"] = sdt(t, mem, le.Uint64(f[fadtXDSDT:]), "DSDT")
	return got
}

func TestTables(t *testing.T) {
	for _, cpus := range []int{1, 4, MaxCPUs} {
		mem := testmem.New(2 << 20)
		rsdp, err := Write(mem, Config{CPUs: cpus, Legacy: Legacy{I8042: true}})
		if err != nil {
			t.Fatal(err)
		}
		if got := findRSDP(t, mem); got != rsdp || rsdp != layout.ACPITablesAddr {
			t.Errorf("RSDP found at %#x, Write says %#x, layout %#x", got, rsdp, layout.ACPITablesAddr)
		}
		tb := tables(t, mem)
		checkFADT(t, tb["FACP"], tb["DSDT"])
		checkMADT(t, tb["APIC"], cpus)
		checkDSDT(t, tb["DSDT"])
	}
}

func checkFADT(t *testing.T, f, dsdt []byte) {
	t.Helper()
	wantGAS := func(off int, port uint16) []byte {
		b := make([]byte, 12)
		gas(b, port)
		if !bytes.Equal(f[off:off+12], b) {
			t.Errorf("FADT GAS at %d = % x, want % x", off, f[off:off+12], b)
		}
		return b
	}
	wantGAS(fadtResetReg, layout.ACPIResetPort)
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"length", uint64(len(f)), fadtSize},
		{"revision", uint64(f[8]), 6},
		{"HW_REDUCED_ACPI (must be off: Linux then drops ISA IRQs)", uint64(le.Uint32(f[fadtFlags:]) >> 20 & 1), 0},
		{"PM1a_EVT_BLK", uint64(le.Uint32(f[fadtPM1aEvtBlk:])), layout.ACPIPM1aEventPort},
		{"PM1_EVT_LEN", uint64(f[fadtPM1EvtLen]), layout.ACPIPM1aEventLen},
		{"PM1_CNT_LEN", uint64(f[fadtPM1CntLen]), layout.ACPIPM1aControlLen},
		{"X_PM1a_CNT_BLK address", le.Uint64(f[fadtXPM1aCntBlk+4:]), layout.ACPIPM1aControlPort},
		{"FACS", uint64(le.Uint32(f[fadtFirmwareCtrl:])), le.Uint64(f[fadtXFirmwareCtrl:])},
		{"RESET_REG_SUP", uint64(le.Uint32(f[fadtFlags:]) >> 10 & 1), 1},
		{"RESET_VALUE", uint64(f[fadtResetValue]), layout.ACPIResetValue},
		{"SCI_INT", uint64(le.Uint16(f[fadtSCIInt:])), layout.ACPISCIIRQ},
		{"DSDT", uint64(le.Uint32(f[fadtDSDT:])), le.Uint64(f[fadtXDSDT:])},
		{"8042 flag", uint64(le.Uint16(f[fadtIAPCBootArch:]) >> 1 & 1), 1},
		{"no CMOS RTC flag", uint64(le.Uint16(f[fadtIAPCBootArch:]) >> 5 & 1), 1},
		{"PM1a_CNT_BLK", uint64(le.Uint32(f[fadtPM1aCntBlk:])), layout.ACPIPM1aControlPort},
	} {
		if c.got != c.want {
			t.Errorf("FADT %s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func checkMADT(t *testing.T, m []byte, cpus int) {
	t.Helper()
	if le.Uint32(m[headerSize:]) != layout.LAPICAddr {
		t.Errorf("MADT local APIC address %#x", le.Uint32(m[headerSize:]))
	}
	var ids []int
	var ioapics, overrides int
	for p := headerSize + 8; p < len(m); {
		typ, n := m[p], int(m[p+1])
		if n < 2 || p+n > len(m) {
			t.Fatalf("MADT entry at %d has length %d", p, n)
		}
		e := m[p : p+n]
		switch typ {
		case madtLocalAPIC:
			if le.Uint32(e[4:])&1 == 0 {
				t.Errorf("CPU %d disabled", e[3])
			}
			if e[2] != e[3] {
				t.Errorf("processor uid %d != APIC id %d", e[2], e[3])
			}
			ids = append(ids, int(e[3]))
		case madtIOAPIC:
			ioapics++
			if le.Uint32(e[4:]) != layout.IOAPICAddr || le.Uint32(e[8:]) != 0 {
				t.Errorf("IOAPIC at %#x GSI base %d", le.Uint32(e[4:]), le.Uint32(e[8:]))
			}
		case madtIntOverride:
			overrides++
			if e[3] == 0 {
				t.Errorf("IRQ0 override to GSI %d: KVM's default routing has the PIT on pin 0", le.Uint32(e[4:]))
			}
			if e[3] == layout.ACPISCIIRQ && (le.Uint32(e[4:]) != layout.ACPISCIIRQ || le.Uint16(e[8:]) != 0xd) {
				t.Errorf("SCI override % x", e)
			}
		}
		p += n
	}
	if len(ids) != cpus {
		t.Fatalf("MADT lists %d CPUs, want %d", len(ids), cpus)
	}
	for i, id := range ids {
		if id != i {
			t.Errorf("CPU %d has APIC id %d", i, id)
		}
	}
	if ioapics != 1 || overrides != 1 {
		t.Errorf("%d IOAPICs and %d overrides, want 1 and 1", ioapics, overrides)
	}
}

func checkDSDT(t *testing.T, d []byte) {
	t.Helper()
	want := []byte{amlNameOp, '_', 'S', '5', '_', amlPackageOp, 8, 4, amlBytePrefix, layout.ACPIS5SleepType, amlBytePrefix, layout.ACPIS5SleepType, 0, 0}
	if !bytes.Equal(d[headerSize:], want) {
		t.Errorf("DSDT AML % x, want % x", d[headerSize:], want)
	}
}

func TestBuildErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		base uint64
		want string
	}{
		{Config{CPUs: 0}, layout.ACPITablesAddr, "0 vCPUs"},
		{Config{CPUs: MaxCPUs + 1}, layout.ACPITablesAddr, "256 vCPUs"},
		{Config{CPUs: 1}, layout.ACPITablesAddr + 8, "not 16-byte aligned"},
	} {
		if _, err := Build(tc.cfg, tc.base); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Build(%+v, %#x) error %v, want %q", tc.cfg, tc.base, err, tc.want)
		}
	}
	if _, err := Write(testmem.New(0x80000), Config{CPUs: 1}); err == nil || !strings.Contains(err.Error(), "writing ACPI tables") {
		t.Errorf("Write to RAM without the BIOS area: %v", err)
	}
}

func TestAMLPkgLength(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want []byte
	}{
		{0, []byte{1}},
		{62, []byte{63}},
		{63, []byte{0x41, 0x04}},         // 65 = 0x41: 1 extra byte, low nibble 1, next 0x04
		{4093, []byte{0x4f, 0xff}},       // 4095
		{4094, []byte{0x81, 0x00, 0x01}}, // 4097 = 0x1001: nibble 1, then 0x00, 0x01
	} {
		if got := amlPkgLength(tc.n); !bytes.Equal(got, tc.want) {
			t.Errorf("amlPkgLength(%d) = % x, want % x", tc.n, got, tc.want)
		}
	}
}

// TestIASL disassembles every table with ACPICA's iasl, which checks
// checksums, lengths, field values and AML syntax.
func TestIASL(t *testing.T) {
	iasl, err := exec.LookPath("iasl")
	if err != nil {
		t.Skip("iasl not installed (Debian package acpica-tools)")
	}
	mem := testmem.New(2 << 20)
	devs := []MMIODevice{{Addr: layout.VirtioMMIOAddr(0), Size: layout.VirtioMMIOSize, IRQ: layout.VirtioIRQ(0)}, {Addr: layout.VirtioMMIOAddr(1), Size: layout.VirtioMMIOSize, IRQ: layout.VirtioIRQ(1)}}
	if _, err := Write(mem, Config{CPUs: 4, Devices: devs}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for sig, b := range tables(t, mem) {
		f := filepath.Join(dir, strings.ToLower(sig)+".dat")
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(iasl, "-d", f).CombinedOutput()
		if err != nil || bytes.Contains(bytes.ToLower(out), []byte("error")) || bytes.Contains(bytes.ToLower(out), []byte("warning")) {
			t.Errorf("iasl -d %s: %v\n%s", sig, err, out)
			continue
		}
		dsl, err := os.ReadFile(strings.TrimSuffix(f, ".dat") + ".dsl")
		if err != nil {
			t.Fatalf("iasl wrote no disassembly for %s: %v", sig, err)
		}
		if sig == "DSDT" && !bytes.Contains(dsl, []byte("Name (_S5, Package")) {
			t.Errorf("DSDT disassembly has no _S5 package:\n%s", dsl)
		}
		if sig == "DSDT" {
			for _, want := range []string{`Device (VR00)`, `Device (VR01)`, `"LNRO0005"`, "Memory32Fixed (ReadWrite,", "0xD0001000", "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"} {
				if !bytes.Contains(dsl, []byte(want)) {
					t.Errorf("DSDT disassembly lacks %q:\n%s", want, dsl)
				}
			}
		}
		if sig == "FACP" && (!bytes.Contains(dsl, []byte("Hardware Reduced (V5) : 0")) || !bytes.Contains(dsl, []byte("PM1A Control Block Address : 00000604"))) {
			t.Errorf("iasl does not see full ACPI with PM1a_CNT at 0x604 in the FADT:\n%s", dsl)
		}
	}
}

// The MADT claims PC-AT compatibility (an 8259 pair) only when there is one.
func TestMADTPCATCompatFollowsPIC(t *testing.T) {
	for _, noPIC := range []bool{false, true} {
		mem := testmem.New(2 << 20)
		if _, err := Write(mem, Config{CPUs: 2, Legacy: Legacy{I8042: true, NoPIC: noPIC}}); err != nil {
			t.Fatal(err)
		}
		m := tables(t, mem)["APIC"]
		checkMADT(t, m, 2)
		if got, want := le.Uint32(m[headerSize+4:])&madtPCATCompat != 0, !noPIC; got != want {
			t.Errorf("NoPIC=%v: PCAT_COMPAT = %v, want %v", noPIC, got, want)
		}
	}
}
