package acpi

import (
	"encoding/binary"
	"fmt"
)

// NUMANode is one proximity domain of the guest: the vCPUs (APIC ids =
// vCPU ids) and guest-physical memory ranges that belong to it. A VM
// spread over slices describes each slice as a node (docs/dsm.md).
type NUMANode struct {
	CPUs []int
	Mem  []MemRange
}

// MemRange is a guest-physical address range.
type MemRange struct{ Base, Size uint64 }

// Distances of the SLIT (ACPI: 10 is a node to itself). RemoteDistance
// is above Linux's node_reclaim_distance (30; 32 on AMD Zen guests), so
// its scheduler does not place forked, exec'd or woken tasks across
// nodes and moves running ones only when the load is unbalanced: a
// slice's short-lived work stays on it, long-running threads spread.
const (
	LocalDistance  = 10
	RemoteDistance = 40
)

// SRAT (System Resource Affinity Table) structure types and flags.
const (
	sratRevision      = 3
	sratLocalAPIC     = 0
	sratMemory        = 1
	sratEnabled       = 1
	sratLAPICEntryLen = 16
	sratMemEntryLen   = 40
)

// checkNUMA checks that nodes give every one of cpus vCPUs exactly one
// node and every node memory.
func checkNUMA(nodes []NUMANode, cpus int) error {
	if len(nodes) == 0 {
		return nil
	}
	if len(nodes) > 255 {
		return fmt.Errorf("ACPI: %d NUMA nodes; at most 255", len(nodes))
	}
	seen := make([]bool, cpus)
	for i, n := range nodes {
		for _, c := range n.CPUs {
			if c < 0 || c >= cpus {
				return fmt.Errorf("ACPI: NUMA node %d lists vCPU %d, the VM has %d", i, c, cpus)
			}
			if seen[c] {
				return fmt.Errorf("ACPI: vCPU %d is in more than one NUMA node", c)
			}
			seen[c] = true
		}
		if len(n.Mem) == 0 {
			return fmt.Errorf("ACPI: NUMA node %d has no memory", i)
		}
		for _, m := range n.Mem {
			if m.Size == 0 {
				return fmt.Errorf("ACPI: NUMA node %d has an empty memory range at %#x", i, m.Base)
			}
		}
	}
	for c, ok := range seen {
		if !ok {
			return fmt.Errorf("ACPI: vCPU %d is in no NUMA node", c)
		}
	}
	return nil
}

// srat lists each node's local APICs and memory ranges.
func srat(nodes []NUMANode) []byte {
	b := make([]byte, 12) // reserved: 1 (for compatibility), then 8 zero bytes
	binary.LittleEndian.PutUint32(b, 1)
	for d, n := range nodes {
		for _, c := range n.CPUs {
			e := make([]byte, sratLAPICEntryLen)
			e[0], e[1] = sratLocalAPIC, sratLAPICEntryLen
			e[2] = uint8(d) // proximity domain, bits 7:0
			e[3] = uint8(c) // APIC id
			binary.LittleEndian.PutUint32(e[4:], sratEnabled)
			// bytes 9-11: proximity domain bits 31:8 (0); 12-15: clock domain
			b = append(b, e...)
		}
		for _, m := range n.Mem {
			e := make([]byte, sratMemEntryLen)
			e[0], e[1] = sratMemory, sratMemEntryLen
			binary.LittleEndian.PutUint32(e[2:], uint32(d))
			binary.LittleEndian.PutUint64(e[8:], m.Base)
			binary.LittleEndian.PutUint64(e[16:], m.Size)
			binary.LittleEndian.PutUint32(e[28:], sratEnabled)
			b = append(b, e...)
		}
	}
	return table("SRAT", sratRevision, b)
}

// slit gives the distance between every pair of nodes.
func slit(n int) []byte {
	b := make([]byte, 8+n*n)
	binary.LittleEndian.PutUint64(b, uint64(n))
	for i := range n {
		for j := range n {
			d := uint8(RemoteDistance)
			if i == j {
				d = LocalDistance
			}
			b[8+i*n+j] = d
		}
	}
	return table("SLIT", 1, b)
}
