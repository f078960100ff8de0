package acpi

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/boot/internal/testmem"
	"github.com/hpcvm/hpcvm/vmm/layout"
)

var twoNodes = []NUMANode{
	{CPUs: []int{0, 1}, Mem: []MemRange{{0, 128 << 20}}},
	{CPUs: []int{2}, Mem: []MemRange{{128 << 20, 128 << 20}, {1 << 32, 64 << 20}}},
}

// TestNUMATables: the SRAT gives each vCPU's APIC id and each memory range
// its node; the SLIT has 10 on the diagonal and RemoteDistance elsewhere;
// a guest without NUMA gets neither table.
func TestNUMATables(t *testing.T) {
	mem := testmem.New(2 << 20)
	if _, err := Write(mem, Config{CPUs: 3, NUMA: twoNodes}); err != nil {
		t.Fatal(err)
	}
	tb := tables(t, mem)
	s := tb["SRAT"]
	if s == nil || tb["SLIT"] == nil {
		t.Fatalf("tables %v: want an SRAT and a SLIT", keys(tb))
	}
	cpuNode := map[int]int{}
	var ranges []string
	for off := headerSize + 12; off < len(s); {
		typ, n := s[off], int(s[off+1])
		if n == 0 || off+n > len(s) {
			t.Fatalf("SRAT entry at %d: length %d", off, n)
		}
		e := s[off : off+n]
		switch typ {
		case sratLocalAPIC:
			if le.Uint32(e[4:])&sratEnabled == 0 {
				t.Errorf("APIC %d not enabled", e[3])
			}
			cpuNode[int(e[3])] = int(e[2]) | int(e[9])<<8 | int(e[10])<<16 | int(e[11])<<24
		case sratMemory:
			ranges = append(ranges, strings.Join([]string{
				itoa(le.Uint32(e[2:])), hex(le.Uint64(e[8:])), hex(le.Uint64(e[16:]))}, ":"))
		default:
			t.Errorf("SRAT entry type %d", typ)
		}
		off += n
	}
	if len(cpuNode) != 3 || cpuNode[0] != 0 || cpuNode[1] != 0 || cpuNode[2] != 1 {
		t.Errorf("SRAT vCPU -> node %v, want 0,1 on 0 and 2 on 1", cpuNode)
	}
	if got := strings.Join(ranges, " "); got != "0:0x0:0x8000000 1:0x8000000:0x8000000 1:0x100000000:0x4000000" {
		t.Errorf("SRAT memory ranges %q", got)
	}
	l := tb["SLIT"][headerSize:]
	if le.Uint64(l) != 2 || string(l[8:]) != string([]byte{10, RemoteDistance, RemoteDistance, 10}) {
		t.Errorf("SLIT body % x", l)
	}

	plain := testmem.New(2 << 20)
	if _, err := Write(plain, Config{CPUs: 3}); err != nil {
		t.Fatal(err)
	}
	if tb := tables(t, plain); tb["SRAT"] != nil || tb["SLIT"] != nil {
		t.Errorf("a guest without NUMA got %v", keys(tb))
	}
}

func TestNUMAErrors(t *testing.T) {
	mem := []MemRange{{0, 1 << 20}}
	for _, tc := range []struct {
		nodes []NUMANode
		want  string
	}{
		{[]NUMANode{{CPUs: []int{0}, Mem: mem}}, "vCPU 1 is in no NUMA node"},
		{[]NUMANode{{CPUs: []int{0, 1}, Mem: mem}, {CPUs: []int{1}, Mem: mem}}, "vCPU 1 is in more than one"},
		{[]NUMANode{{CPUs: []int{0, 2}, Mem: mem}}, "lists vCPU 2, the VM has 2"},
		{[]NUMANode{{CPUs: []int{0, 1}}}, "node 0 has no memory"},
		{[]NUMANode{{CPUs: []int{0, 1}, Mem: []MemRange{{4096, 0}}}}, "empty memory range at 0x1000"},
	} {
		if _, err := Build(Config{CPUs: 2, NUMA: tc.nodes}, layout.ACPITablesAddr); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NUMA %+v: error %v, want %q", tc.nodes, err, tc.want)
		}
	}
}

// TestNUMAIASL has ACPICA's iasl check the SRAT and SLIT.
func TestNUMAIASL(t *testing.T) {
	iasl, err := exec.LookPath("iasl")
	if err != nil {
		t.Skip("iasl not installed (Debian package acpica-tools)")
	}
	mem := testmem.New(2 << 20)
	if _, err := Write(mem, Config{CPUs: 3, NUMA: twoNodes}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, sig := range []string{"SRAT", "SLIT"} {
		f := filepath.Join(dir, strings.ToLower(sig)+".dat")
		if err := os.WriteFile(f, tables(t, mem)[sig], 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(iasl, "-d", f).CombinedOutput()
		if err != nil || strings.Contains(strings.ToLower(string(out)), "error") || strings.Contains(strings.ToLower(string(out)), "warning") {
			t.Errorf("iasl -d %s: %v\n%s", sig, err, out)
			continue
		}
		dsl, err := os.ReadFile(strings.TrimSuffix(f, ".dat") + ".dsl")
		if err != nil {
			t.Fatal(err)
		}
		want := "Proximity Domain Low(8) : 01"
		if sig == "SLIT" {
			want = "Locality   1 : 28 0A" // 40, 10 in hex
		}
		if !strings.Contains(string(dsl), want) {
			t.Errorf("iasl's %s lacks %q:\n%s", sig, want, dsl)
		}
	}
}

func keys(m map[string][]byte) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	return k
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }
func hex(v uint64) string  { return "0x" + strconv.FormatUint(v, 16) }
