package boot

import (
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/boot/acpi"
)

// numaAlign is the granularity of a node's memory: Linux's sections and
// huge pages never straddle two nodes.
const numaAlign = 2 << 20

// numaNodes gives each node of cpus (the vCPUs of each NUMA node) an equal
// share of ram, in address order, in numaAlign steps; the last node takes
// what is left. Linux drops nodes smaller than 4 MiB, so a share below
// 16 MiB is an error.
func numaNodes(ram []Region, cpus [][]int) ([]acpi.NUMANode, error) {
	if len(cpus) == 0 {
		return nil, nil
	}
	var total uint64
	for _, r := range ram {
		total += r.Size
	}
	share := total / uint64(len(cpus)) / numaAlign * numaAlign
	if share < 16<<20 {
		return nil, fmt.Errorf("%d MiB of RAM is too little for %d NUMA nodes (16 MiB each at least)", total>>20, len(cpus))
	}
	nodes := make([]acpi.NUMANode, len(cpus))
	n, left := 0, share // the node being filled, and what it still takes
	for _, r := range ram {
		for start := r.Start; start < r.End(); {
			size := r.End() - start
			if n < len(cpus)-1 {
				size = min(size, left)
			}
			nodes[n].Mem = append(nodes[n].Mem, acpi.MemRange{Base: start, Size: size})
			start += size
			if left -= min(left, size); left == 0 && n < len(cpus)-1 {
				n, left = n+1, share
			}
		}
	}
	for i, c := range cpus {
		nodes[i].CPUs = c
	}
	return nodes, nil
}
