package boot

import (
	"fmt"
	"strings"
	"testing"
)

func TestNUMANodesShareRAM(t *testing.T) {
	const mib = 1 << 20
	below4G := Region{0, 3072 * mib}
	above4G := Region{1 << 32, 1024 * mib}
	for _, tc := range []struct {
		ram  []Region
		cpus [][]int
		want string
	}{
		{[]Region{{0, 256 * mib}}, [][]int{{0}, {1}}, "[{[0] [{0 134217728}]} {[1] [{134217728 134217728}]}]"},
		// 3 nodes of 85.33 MiB: 84 MiB each (2 MiB steps), the last takes the rest.
		{[]Region{{0, 256 * mib}}, [][]int{{0}, {1}, {2, 3}}, "[{[0] [{0 88080384}]} {[1] [{88080384 88080384}]} {[2 3] [{176160768 92274688}]}]"},
		// RAM below and above the MMIO gap.
		{[]Region{below4G, above4G}, [][]int{{0}, {1}, {2}, {3}}, fmt.Sprint([]any{
			"{[0] [{0 1073741824}]}", "{[1] [{1073741824 1073741824}]}", "{[2] [{2147483648 1073741824}]}", "{[3] [{4294967296 1073741824}]}"})},
		// 1364 MiB each (4 GiB / 3 in 2 MiB steps); the last node spans
		// the gap: two ranges.
		{[]Region{below4G, above4G}, [][]int{{0}, {1}, {2}}, fmt.Sprint([]any{
			"{[0] [{0 1430257664}]}", "{[1] [{1430257664 1430257664}]}", "{[2] [{2860515328 360710144} {4294967296 1073741824}]}"})},
	} {
		nodes, err := numaNodes(tc.ram, tc.cpus)
		if err != nil {
			t.Fatal(err)
		}
		var total uint64
		for _, n := range nodes {
			for _, m := range n.Mem {
				total += m.Size
			}
		}
		var ram uint64
		for _, r := range tc.ram {
			ram += r.Size
		}
		if got := strings.ReplaceAll(fmt.Sprint(nodes), "\"", ""); got != tc.want || total != ram {
			t.Errorf("numaNodes(%v, %v) = %s (%d bytes), want %s (%d bytes)", tc.ram, tc.cpus, got, total, tc.want, ram)
		}
	}
	if nodes, err := numaNodes([]Region{{0, 256 * mib}}, nil); nodes != nil || err != nil {
		t.Errorf("no NUMA: %v, %v", nodes, err)
	}
	if _, err := numaNodes([]Region{{0, 30 * mib}}, [][]int{{0}, {1}}); err == nil || !strings.Contains(err.Error(), "too little for 2 NUMA nodes") {
		t.Errorf("30 MiB over 2 nodes: %v", err)
	}
}
