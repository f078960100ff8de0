package dsm

import (
	"fmt"
	"strconv"
	"strings"
)

// ParsePlacement parses a vCPU placement: one group per slice in slice-id
// order, separated by '/'; a group is a comma-separated list of vCPU ids
// and ranges a-b, and may be empty (that slice runs no vCPU). Example:
// "0-1/2,3/" is 4 vCPUs on slices 0 and 1 and none on slice 2.
func ParsePlacement(s string) ([][]int, error) {
	if strings.TrimSpace(s) == "" {
		return nil, fmt.Errorf("dsm: empty vCPU placement")
	}
	var out [][]int
	for i, g := range strings.Split(s, "/") {
		group := []int{}
		for _, item := range strings.Split(g, ",") {
			item = strings.TrimSpace(item)
			if item == "" {
				if strings.TrimSpace(g) != "" {
					return nil, fmt.Errorf("dsm: placement group %d (%q): empty list item", i, g)
				}
				continue
			}
			lo, hi, isRange := strings.Cut(item, "-")
			a, err := strconv.Atoi(lo)
			if err != nil || a < 0 {
				return nil, fmt.Errorf("dsm: placement group %d: %q is not a vCPU id", i, item)
			}
			b := a
			if isRange {
				if b, err = strconv.Atoi(hi); err != nil || b < a {
					return nil, fmt.Errorf("dsm: placement group %d: %q is not a range a-b with a <= b", i, item)
				}
			}
			if b-a >= maxVCPUs {
				return nil, fmt.Errorf("dsm: placement group %d: range %q is too large", i, item)
			}
			for id := a; id <= b; id++ {
				group = append(group, id)
			}
		}
		out = append(out, group)
	}
	return out, nil
}

// maxVCPUs bounds a placement (KVM's own limit is usually 1024 or less).
const maxVCPUs = 1024

// CheckPlacement verifies that placement assigns every vCPU 0..n-1 to
// exactly one of slices slices and returns n.
func CheckPlacement(placement [][]int, slices int) (int, error) {
	if len(placement) != slices {
		return 0, fmt.Errorf("dsm: vCPU placement has %d groups for %d slices", len(placement), slices)
	}
	owner := map[int]int{}
	n := 0
	for s, g := range placement {
		for _, id := range g {
			if id < 0 || id >= maxVCPUs {
				return 0, fmt.Errorf("dsm: vCPU id %d out of range 0..%d", id, maxVCPUs-1)
			}
			if o, dup := owner[id]; dup {
				return 0, fmt.Errorf("dsm: vCPU %d placed on slice %d and slice %d", id, o, s)
			}
			owner[id] = s
			n++
		}
	}
	if n == 0 {
		return 0, fmt.Errorf("dsm: vCPU placement runs no vCPU at all")
	}
	for id := 0; id < n; id++ {
		if _, ok := owner[id]; !ok {
			return 0, fmt.Errorf("dsm: vCPU placement has %d vCPUs but none is vCPU %d (ids must be 0..%d)", n, id, n-1)
		}
	}
	return n, nil
}

// FormatPlacement is the inverse of ParsePlacement.
func FormatPlacement(placement [][]int) string {
	var groups []string
	for _, g := range placement {
		var ids []string
		for _, id := range g {
			ids = append(ids, strconv.Itoa(id))
		}
		groups = append(groups, strings.Join(ids, ","))
	}
	return strings.Join(groups, "/")
}
