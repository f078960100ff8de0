package policies

import (
	"encoding/json"
	"fmt"
	"time"
)

// EffectiveSchemaVersion is the "schema" field of Effective's JSON form; it
// changes only when a field changes meaning or disappears.
const EffectiveSchemaVersion = 1

// effectiveJSON is the wire form of Effective for the job launcher: plain
// numbers in bytes and seconds, so no consumer needs hpcvm's unit parser.
type effectiveJSON struct {
	Schema                 int               `json:"schema"`
	JobID                  string            `json:"job_id,omitempty"`
	User                   string            `json:"user"`
	Account                string            `json:"account,omitempty"`
	Partition              string            `json:"partition,omitempty"`
	QOS                    string            `json:"qos,omitempty"`
	Image                  string            `json:"image"`
	Nodes                  int               `json:"nodes"`
	VCPUs                  int               `json:"vcpus"`
	VCPUsPerNode           int               `json:"vcpus_per_node"`
	MemPerNodeBytes        int64             `json:"mem_per_node_bytes"`
	VMMReservePerNodeBytes int64             `json:"vmm_mem_reserve_per_node_bytes"`
	WalltimeSeconds        int64             `json:"walltime_seconds"`
	Checkpoint             checkpointJSON    `json:"checkpoint"`
	Migration              migrationJSON     `json:"migration"`
	Cgroup                 cgroupJSON        `json:"cgroup"`
	Warnings               []string          `json:"warnings"`
	Provenance             map[string]Origin `json:"provenance"`
}

type checkpointJSON struct {
	IntervalSeconds       int64  `json:"interval_seconds"`
	BeforeWalltimeSeconds int64  `json:"before_walltime_seconds"`
	Dir                   string `json:"dir"`
	Keep                  int    `json:"keep"`
	MaxSizeBytes          int64  `json:"max_size_bytes"`
}

type migrationJSON struct {
	Enabled       bool     `json:"enabled"`
	Predictors    []string `json:"predictors"`
	RiskThreshold float64  `json:"risk_threshold"`
	SpareNodes    int      `json:"spare_nodes"`
}

type cgroupJSON struct {
	CPUWeight       int   `json:"cpu_weight"`
	CPUQuotaPercent int   `json:"cpu_quota_percent"`
	MemoryMaxBytes  int64 `json:"memory_max_bytes"`
	MemoryHighBytes int64 `json:"memory_high_bytes"`
	PidsMax         int   `json:"pids_max"`
	IOWeight        int   `json:"io_weight"`
}

func seconds(d Duration) int64 { return d.Seconds() }

func fromSeconds(s int64) Duration { return Duration(time.Duration(s) * time.Second) }

// MarshalJSON writes the documented wire form.
func (e *Effective) MarshalJSON() ([]byte, error) {
	w := effectiveJSON{
		Schema: EffectiveSchemaVersion, JobID: e.JobID, User: e.User, Account: e.Account, Partition: e.Partition, QOS: e.QOS,
		Image: e.Image, Nodes: e.Nodes, VCPUs: e.VCPUs, VCPUsPerNode: e.VCPUsPerNode,
		MemPerNodeBytes: int64(e.MemPerNode), VMMReservePerNodeBytes: int64(e.VMMReservePerNode),
		WalltimeSeconds: seconds(e.Walltime),
		Checkpoint: checkpointJSON{
			IntervalSeconds: seconds(e.Checkpoint.Interval), BeforeWalltimeSeconds: seconds(e.Checkpoint.BeforeWalltime),
			Dir: e.Checkpoint.Dir, Keep: e.Checkpoint.Keep, MaxSizeBytes: int64(e.Checkpoint.MaxSize),
		},
		Migration: migrationJSON{
			Enabled: e.Migration.Enabled, Predictors: e.Migration.Predictors,
			RiskThreshold: e.Migration.RiskThreshold, SpareNodes: e.Migration.SpareNodes,
		},
		Cgroup: cgroupJSON{
			CPUWeight: e.Cgroup.CPUWeight, CPUQuotaPercent: e.Cgroup.CPUQuotaPercent,
			MemoryMaxBytes: int64(e.Cgroup.MemoryMax), MemoryHighBytes: int64(e.Cgroup.MemoryHigh),
			PidsMax: e.Cgroup.PidsMax, IOWeight: e.Cgroup.IOWeight,
		},
		Warnings: e.Warnings, Provenance: e.Provenance,
	}
	// Empty lists as [] rather than null: consumers in other languages
	// iterate them without a nil check.
	if w.Migration.Predictors == nil {
		w.Migration.Predictors = []string{}
	}
	if w.Warnings == nil {
		w.Warnings = []string{}
	}
	return json.Marshal(w)
}

// UnmarshalJSON reads the wire form, so a Go launcher can decode what
// `hpcvm policy admit --json` prints.
func (e *Effective) UnmarshalJSON(b []byte) error {
	var w effectiveJSON
	if err := json.Unmarshal(b, &w); err != nil {
		return fmt.Errorf("effective settings: %w", err)
	}
	if w.Schema != EffectiveSchemaVersion {
		return fmt.Errorf("effective settings: schema %d, want %d", w.Schema, EffectiveSchemaVersion)
	}
	*e = Effective{
		JobID: w.JobID, User: w.User, Account: w.Account, Partition: w.Partition, QOS: w.QOS,
		Image: w.Image, Nodes: w.Nodes, VCPUs: w.VCPUs, VCPUsPerNode: w.VCPUsPerNode,
		MemPerNode: Size(w.MemPerNodeBytes), VMMReservePerNode: Size(w.VMMReservePerNodeBytes),
		Walltime: fromSeconds(w.WalltimeSeconds),
		Checkpoint: CheckpointSettings{
			Interval: fromSeconds(w.Checkpoint.IntervalSeconds), BeforeWalltime: fromSeconds(w.Checkpoint.BeforeWalltimeSeconds),
			Dir: w.Checkpoint.Dir, Keep: w.Checkpoint.Keep, MaxSize: Size(w.Checkpoint.MaxSizeBytes),
		},
		Migration: MigrationSettings{
			Enabled: w.Migration.Enabled, Predictors: w.Migration.Predictors,
			RiskThreshold: w.Migration.RiskThreshold, SpareNodes: w.Migration.SpareNodes,
		},
		Cgroup: CgroupSettings{
			CPUWeight: w.Cgroup.CPUWeight, CPUQuotaPercent: w.Cgroup.CPUQuotaPercent,
			MemoryMax: Size(w.Cgroup.MemoryMaxBytes), MemoryHigh: Size(w.Cgroup.MemoryHighBytes),
			PidsMax: w.Cgroup.PidsMax, IOWeight: w.Cgroup.IOWeight,
		},
		Warnings: w.Warnings, Provenance: w.Provenance,
	}
	return nil
}
