// Package launcher is `hpcvm launch`: the program the hpcvm SPANK plugin
// runs on a compute node in place of a job's task. It reads the Slurm
// environment, asks the site policy for the VM's effective settings, starts
// one VMM slice per allocated node through Slurm (srun --overlap), stages the
// job script into the guest, runs it through the guest agent with the job's
// SLURM_* environment, and makes its exit status the step's. See
// docs/slurm.md.
package launcher

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// SlurmEnv is what a job step's environment says about its allocation.
type SlurmEnv struct {
	JobID  string
	StepID string // empty for the batch step
	// Nodes are the step's nodes (SLURM_STEP_NODELIST, else
	// SLURM_JOB_NODELIST), expanded.
	Nodes []string
	// CPUsPerNode is the CPUs allocated on each of Nodes
	// (SLURM_JOB_CPUS_PER_NODE, e.g. "2(x3),1").
	CPUsPerNode []int
	// MemPerNodeMiB is the memory allocated on each node: SLURM_MEM_PER_NODE,
	// or SLURM_MEM_PER_CPU times the node's CPUs (the smallest); 0 if
	// Slurm does not allocate memory.
	MemPerNodeMiB int64
	ProcID        int // SLURM_PROCID: global task id
	User          string
	UID, GID      int
	Partition     string
	Account       string
	QOS           string
	SubmitDir     string
	NodeName      string // SLURMD_NODENAME: this node
	Cluster       string // SLURM_CLUSTER_NAME
}

// TotalCPUs is the number of CPUs allocated over all nodes.
func (e *SlurmEnv) TotalCPUs() int {
	n := 0
	for _, c := range e.CPUsPerNode {
		n += c
	}
	return n
}

// ParseEnv reads a step's environment (KEY=VALUE strings as in
// os.Environ()).
func ParseEnv(environ []string) (*SlurmEnv, error) {
	m := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	e := &SlurmEnv{
		JobID: m["SLURM_JOB_ID"], StepID: m["SLURM_STEP_ID"], User: m["SLURM_JOB_USER"],
		Partition: m["SLURM_JOB_PARTITION"], Account: m["SLURM_JOB_ACCOUNT"], QOS: m["SLURM_JOB_QOS"],
		SubmitDir: m["SLURM_SUBMIT_DIR"], NodeName: m["SLURMD_NODENAME"], Cluster: m["SLURM_CLUSTER_NAME"],
	}
	if e.JobID == "" {
		e.JobID = m["SLURM_JOBID"]
	}
	if e.JobID == "" {
		return nil, fmt.Errorf("SLURM_JOB_ID is not set: hpcvm launch runs inside a Slurm job step")
	}
	list := m["SLURM_STEP_NODELIST"]
	if list == "" {
		list = m["SLURM_JOB_NODELIST"]
	}
	if list == "" {
		list = m["SLURM_NODELIST"]
	}
	if list == "" {
		return nil, fmt.Errorf("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
	}
	nodes, err := ExpandHostlist(list)
	if err != nil {
		return nil, fmt.Errorf("node list %q: %w", list, err)
	}
	e.Nodes = nodes

	cpus := m["SLURM_JOB_CPUS_PER_NODE"]
	if cpus == "" {
		return nil, fmt.Errorf("SLURM_JOB_CPUS_PER_NODE is not set")
	}
	perNode, err := ParseCPUsPerNode(cpus)
	if err != nil {
		return nil, fmt.Errorf("SLURM_JOB_CPUS_PER_NODE=%q: %w", cpus, err)
	}
	// The job's list covers the job's nodes; a step may use fewer.
	if len(perNode) < len(nodes) {
		return nil, fmt.Errorf("SLURM_JOB_CPUS_PER_NODE=%q covers %d node(s), the node list has %d", cpus, len(perNode), len(nodes))
	}
	e.CPUsPerNode = perNode[:len(nodes)]

	if v := m["SLURM_MEM_PER_NODE"]; v != "" {
		if e.MemPerNodeMiB, err = strconv.ParseInt(v, 10, 64); err != nil || e.MemPerNodeMiB < 0 {
			return nil, fmt.Errorf("SLURM_MEM_PER_NODE=%q: not a size in MiB", v)
		}
	} else if v := m["SLURM_MEM_PER_CPU"]; v != "" {
		per, err := strconv.ParseInt(v, 10, 64)
		if err != nil || per < 0 {
			return nil, fmt.Errorf("SLURM_MEM_PER_CPU=%q: not a size in MiB", v)
		}
		minCPUs := e.CPUsPerNode[0]
		for _, c := range e.CPUsPerNode {
			minCPUs = min(minCPUs, c)
		}
		e.MemPerNodeMiB = per * int64(minCPUs)
	}
	for _, f := range []struct {
		key string
		dst *int
		def int
	}{{"SLURM_PROCID", &e.ProcID, 0}, {"SLURM_JOB_UID", &e.UID, -1}, {"SLURM_JOB_GID", &e.GID, -1}} {
		*f.dst = f.def
		if v := m[f.key]; v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return nil, fmt.Errorf("%s=%q: not a number", f.key, v)
			}
			*f.dst = n
		}
	}
	return e, nil
}

// ParseCPUsPerNode expands Slurm's compressed CPU counts: "2(x3),1" is
// [2 2 2 1].
func ParseCPUsPerNode(s string) ([]int, error) {
	var out []int
	for _, part := range strings.Split(s, ",") {
		count, rep := part, "1"
		if i := strings.IndexByte(part, '('); i >= 0 {
			if !strings.HasPrefix(part[i:], "(x") || !strings.HasSuffix(part, ")") {
				return nil, fmt.Errorf("bad element %q", part)
			}
			count, rep = part[:i], part[i+2:len(part)-1]
		}
		c, err := strconv.Atoi(count)
		if err != nil || c < 0 {
			return nil, fmt.Errorf("bad CPU count %q", count)
		}
		r, err := strconv.Atoi(rep)
		if err != nil || r < 1 || r > 1<<20 || len(out)+r > 1<<20 {
			return nil, fmt.Errorf("bad repetition %q", rep)
		}
		for range r {
			out = append(out, c)
		}
	}
	return out, nil
}

// maxHosts bounds an expanded host list, so that "n[0-999999999]" is an
// error rather than an allocation of gigabytes.
const maxHosts = 1 << 20

// ExpandHostlist expands a Slurm host list such as "n[1-3,5],gpu[01-02]x"
// into host names, in order. Ranges keep their zero padding ("n[08-10]" is
// n08 n09 n10). Several bracket groups in one name multiply out
// ("r[1-2]n[1-2]" is r1n1 r1n2 r2n1 r2n2), as in Slurm.
func ExpandHostlist(s string) ([]string, error) {
	var out []string
	for _, item := range splitTop(s) {
		if item == "" {
			return nil, fmt.Errorf("empty host name")
		}
		names, err := expandOne(item, maxHosts-len(out))
		if err != nil {
			return nil, err
		}
		out = append(out, names...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty host list")
	}
	return out, nil
}

// splitTop splits at commas outside brackets.
func splitTop(s string) []string {
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '[':
			depth++
		case ']':
			depth--
		case ',':
			if depth == 0 {
				parts = append(parts, s[start:i])
				start = i + 1
			}
		}
	}
	return append(parts, s[start:])
}

func expandOne(item string, limit int) ([]string, error) {
	open := strings.IndexByte(item, '[')
	if open < 0 {
		if strings.ContainsAny(item, "]") {
			return nil, fmt.Errorf("%q: unbalanced ']'", item)
		}
		return []string{item}, nil
	}
	closeAt := strings.IndexByte(item[open:], ']')
	if closeAt < 0 {
		return nil, fmt.Errorf("%q: missing ']'", item)
	}
	closeAt += open
	prefix, body, rest := item[:open], item[open+1:closeAt], item[closeAt+1:]
	if strings.ContainsAny(prefix, "]") || strings.ContainsAny(body, "[") {
		return nil, fmt.Errorf("%q: nested or unbalanced brackets", item)
	}
	var mids []string
	for _, r := range strings.Split(body, ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		if !isRange {
			hi = lo
		}
		if lo == "" || hi == "" || !digits(lo) || !digits(hi) {
			return nil, fmt.Errorf("%q: bad range %q", item, r)
		}
		a, err1 := strconv.Atoi(lo)
		b, err2 := strconv.Atoi(hi)
		if err1 != nil || err2 != nil || b < a {
			return nil, fmt.Errorf("%q: bad range %q", item, r)
		}
		if b-a >= limit {
			return nil, fmt.Errorf("%q: more than %d hosts", item, maxHosts)
		}
		width := 0
		if len(lo) > 1 && lo[0] == '0' {
			width = len(lo)
		}
		for n := a; n <= b; n++ {
			mids = append(mids, fmt.Sprintf("%0*d", width, n))
		}
	}
	tails, err := expandOne(rest, limit)
	if err != nil {
		return nil, err
	}
	if len(mids)*len(tails) > limit {
		return nil, fmt.Errorf("%q: more than %d hosts", item, maxHosts)
	}
	out := make([]string, 0, len(mids)*len(tails))
	for _, m := range mids {
		for _, t := range tails {
			out = append(out, prefix+m+t)
		}
	}
	return out, nil
}

func digits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return len(s) > 0 && len(s) <= 9
}

// ParseTimeLimit reads Slurm's time limit format as `scontrol show job`
// prints it: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS",
// or UNLIMITED/INFINITE/NONE/Partition_Limit (0: no limit known).
func ParseTimeLimit(s string) (time.Duration, error) {
	switch strings.ToUpper(s) {
	case "UNLIMITED", "INFINITE", "NONE", "PARTITION_LIMIT", "":
		return 0, nil
	}
	days := 0
	rest := s
	if d, r, ok := strings.Cut(s, "-"); ok {
		n, err := strconv.Atoi(d)
		if err != nil || n < 0 || !digits(d) {
			return 0, fmt.Errorf("time limit %q: bad days", s)
		}
		days, rest = n, r
	}
	parts := strings.Split(rest, ":")
	if len(parts) > 3 {
		return 0, fmt.Errorf("time limit %q: too many fields", s)
	}
	nums := make([]int, len(parts))
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || !digits(p) {
			return 0, fmt.Errorf("time limit %q: bad field %q", s, p)
		}
		nums[i] = n
	}
	var h, m, sec int
	switch {
	case strings.Contains(s, "-"): // D-HH[:MM[:SS]]
		h = nums[0]
		if len(nums) > 1 {
			m = nums[1]
		}
		if len(nums) > 2 {
			sec = nums[2]
		}
	case len(nums) == 1:
		m = nums[0]
	case len(nums) == 2:
		m, sec = nums[0], nums[1]
	default:
		h, m, sec = nums[0], nums[1], nums[2]
	}
	return time.Duration(days)*24*time.Hour + time.Duration(h)*time.Hour + time.Duration(m)*time.Minute + time.Duration(sec)*time.Second, nil
}
