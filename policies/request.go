package policies

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode"
)

// Request is what a job asks for at submission: Slurm's view of the job plus
// the user's --vm-* options. The JSON names are what `hpcvm policy admit`
// reads on standard input (see docs/policies.md).
type Request struct {
	JobID     string   `json:"job_id,omitempty"`
	User      string   `json:"user"`
	Groups    []string `json:"groups,omitempty"`
	Account   string   `json:"account,omitempty"`
	Partition string   `json:"partition,omitempty"`
	QOS       string   `json:"qos,omitempty"`
	Image     string   `json:"image"`
	// Nodes is the node count; 0 means 1.
	Nodes int `json:"nodes,omitempty"`
	// CPUs is vCPUs for the whole VM; CPUsPerNode the vCPUs on each node.
	// Either, both (consistent) or neither may be given.
	CPUs        int  `json:"cpus,omitempty"`
	CPUsPerNode int  `json:"cpus_per_node,omitempty"`
	MemPerNode  Size `json:"mem_per_node,omitzero"`
	// Walltime is the job's time limit; 0 means unknown.
	Walltime Duration `json:"walltime,omitzero"`
	// CheckpointInterval is the user's wish: unset, a duration, or "off".
	CheckpointInterval OptDuration `json:"checkpoint_interval,omitzero"`
	// CheckpointAtWalltime: unset, yes, no, or a lead time.
	CheckpointAtWalltime WalltimeCheckpoint `json:"checkpoint_at_walltime,omitzero"`
	Migration            Wish               `json:"migration,omitzero"`
}

// OptDuration is a duration the user may leave unset, or set to "off" (0).
type OptDuration struct {
	Set   bool
	Value Duration
}

// IsZero reports whether the duration was left unset.
func (o OptDuration) IsZero() bool { return !o.Set }

// UnmarshalText reads a duration, or "off"/"no"/"0" for none.
func (o *OptDuration) UnmarshalText(b []byte) error {
	if strings.TrimSpace(string(b)) == "" {
		*o = OptDuration{}
		return nil
	}
	d, err := parseSwitchDuration(string(b))
	if err != nil {
		return err
	}
	*o = OptDuration{Set: true, Value: d}
	return nil
}

// MarshalText writes "off" for 0.
func (o OptDuration) MarshalText() ([]byte, error) {
	if o.Set && o.Value == 0 {
		return []byte("off"), nil
	}
	return o.Value.MarshalText()
}

func (o OptDuration) String() string {
	b, _ := o.MarshalText()
	return string(b)
}

// WalltimeCheckpoint is the user's wish to be checkpointed before the
// walltime ends: unset, no, yes (with the site's lead time), or yes with a
// lead time of their own.
type WalltimeCheckpoint struct {
	Wish Wish
	Lead Duration // 0 with WishYes: the policy's lead time
}

// IsZero reports whether no wish was expressed.
func (w WalltimeCheckpoint) IsZero() bool { return w.Wish == WishUnset }

// ParseWalltimeCheckpoint reads "", yes/no (see ParseWish) or a lead time
// such as "15m" ("0" means no).
func ParseWalltimeCheckpoint(s string) (WalltimeCheckpoint, error) {
	if w, err := ParseWish(s); err == nil {
		return WalltimeCheckpoint{Wish: w}, nil
	}
	d, err := ParseDuration(s)
	if err != nil {
		return WalltimeCheckpoint{}, fmt.Errorf("%q: want yes, no or a lead time such as 15m", s)
	}
	if d == 0 {
		return WalltimeCheckpoint{Wish: WishNo}, nil
	}
	return WalltimeCheckpoint{Wish: WishYes, Lead: d}, nil
}

func (w WalltimeCheckpoint) String() string {
	if w.Wish == WishYes && w.Lead > 0 {
		return w.Lead.String()
	}
	return w.Wish.String()
}

// UnmarshalJSON accepts true, false, null and the strings
// ParseWalltimeCheckpoint accepts.
func (w *WalltimeCheckpoint) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var wish Wish
		if err := wish.UnmarshalJSON(b); err != nil {
			return err
		}
		*w = WalltimeCheckpoint{Wish: wish}
		return nil
	}
	v, err := ParseWalltimeCheckpoint(s)
	if err != nil {
		return err
	}
	*w = v
	return nil
}

// MarshalJSON writes null, true, false or the lead time as a string.
func (w WalltimeCheckpoint) MarshalJSON() ([]byte, error) {
	if w.Wish == WishYes && w.Lead > 0 {
		return json.Marshal(w.Lead.String())
	}
	return w.Wish.MarshalJSON()
}

// The option names users know, used in every message about their request.
const (
	optImage      = "--vm-image"
	optNodes      = "--nodes"
	optCPUs       = "--vm-cpus"
	optCPUsNode   = "--vm-cpus-per-node"
	optMem        = "--vm-mem"
	optWalltime   = "--time"
	optInterval   = "--vm-checkpoint-interval"
	optAtWalltime = "--vm-checkpoint-at-walltime"
	optMigration  = "--vm-migration"
)

// RequestError is a malformed request: not the policy's refusal but a
// mistake in what was asked.
type RequestError struct {
	Field string // the option or JSON field, e.g. "--vm-mem" or "user"
	Msg   string
}

func (e *RequestError) Error() string {
	return fmt.Sprintf("hpcvm: invalid request: %s: %s", e.Field, e.Msg)
}

// Validate checks the request on its own, before any policy is applied.
func (r *Request) Validate() error {
	for _, f := range []struct{ name, v string }{{"user", r.User}, {optImage, r.Image}} {
		if f.v == "" {
			return &RequestError{Field: f.name, Msg: "missing"}
		}
	}
	names := []struct{ name, v string }{{"user", r.User}, {optImage, r.Image}, {"account", r.Account},
		{"partition", r.Partition}, {"qos", r.QOS}, {"job_id", r.JobID}}
	for _, g := range r.Groups {
		names = append(names, struct{ name, v string }{"groups", g})
	}
	for _, f := range names {
		if strings.ContainsFunc(f.v, func(c rune) bool { return unicode.IsSpace(c) || unicode.IsControl(c) }) {
			return &RequestError{Field: f.name, Msg: fmt.Sprintf("%q contains a space or control character", f.v)}
		}
	}
	for _, f := range []struct {
		name string
		v    int
	}{{optNodes, r.Nodes}, {optCPUs, r.CPUs}, {optCPUsNode, r.CPUsPerNode}} {
		if f.v < 0 || f.v > 1<<24 {
			return &RequestError{Field: f.name, Msg: fmt.Sprintf("%d is out of range", f.v)}
		}
	}
	if r.MemPerNode < 0 {
		return &RequestError{Field: optMem, Msg: "negative"}
	}
	if r.Walltime < 0 {
		return &RequestError{Field: optWalltime, Msg: "negative"}
	}
	if r.CheckpointInterval.Value < 0 || r.CheckpointAtWalltime.Lead < 0 {
		return &RequestError{Field: optInterval, Msg: "negative"}
	}
	nodes := max(r.Nodes, 1)
	if r.CPUs > 0 && r.CPUs < nodes {
		return &RequestError{Field: optCPUs, Msg: fmt.Sprintf("%s=%d is fewer than the %d nodes: every node needs a vCPU", optCPUs, r.CPUs, nodes)}
	}
	if r.CPUs > 0 && r.CPUsPerNode > 0 && (r.CPUs > r.CPUsPerNode*nodes || r.CPUs <= (r.CPUsPerNode-1)*nodes) {
		return &RequestError{Field: optCPUs, Msg: fmt.Sprintf("%s=%d does not fit %s=%d on %d node(s)", optCPUs, r.CPUs, optCPUsNode, r.CPUsPerNode, nodes)}
	}
	return nil
}
