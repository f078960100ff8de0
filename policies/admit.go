package policies

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Built-in values used when no rule sets a setting. They are documented in
// docs/policies.md; a site overrides them in [defaults].
const (
	DefaultCPUsPerNode    = 1
	DefaultVMMReserve     = Size(256 << 20)
	DefaultBeforeWalltime = Duration(10 * time.Minute)
	DefaultKeep           = 1
	DefaultRiskThreshold  = 0.8
)

// Origin says where an effective setting came from.
type Origin struct {
	// Kind is "rule" (File, Line and Rule are set), "request", "built-in"
	// or "computed" (derived from other settings).
	Kind string `json:"kind"`
	Rule string `json:"rule,omitempty"`
	File string `json:"file,omitempty"`
	Line int    `json:"line,omitempty"`
}

func (o Origin) String() string {
	switch o.Kind {
	case "rule":
		return fmt.Sprintf("rule %q (%s:%d)", o.Rule, o.File, o.Line)
	case "request":
		return "your request"
	case "":
		return "nothing"
	}
	return o.Kind
}

var (
	fromRequest = Origin{Kind: "request"}
	builtIn     = Origin{Kind: "built-in"}
	computed    = Origin{Kind: "computed"}
)

func (r *rule) origin(line int) Origin {
	if line == 0 {
		line = r.line
	}
	return Origin{Kind: "rule", Rule: r.name, File: r.file, Line: line}
}

// Effective is what the VM will get: the request merged with the policy.
// Zero means "none" for Checkpoint.Interval and BeforeWalltime, and "not
// set, leave the kernel default" for the cgroup fields other than
// MemoryMax. Its JSON form is documented in docs/policies.md.
type Effective struct {
	JobID             string
	User              string
	Account           string
	Partition         string
	QOS               string
	Image             string
	Nodes             int
	VCPUs             int // whole VM
	VCPUsPerNode      int // most vCPUs on any one node
	MemPerNode        Size
	VMMReservePerNode Size
	Walltime          Duration
	Checkpoint        CheckpointSettings
	Migration         MigrationSettings
	Cgroup            CgroupSettings
	Warnings          []string
	// Provenance maps each setting's name ("mem_per_node",
	// "checkpoint.interval", ...) to where its value came from.
	Provenance map[string]Origin
}

// CheckpointSettings says when and where the VM is checkpointed.
type CheckpointSettings struct {
	Interval       Duration // periodic checkpoints; 0: none
	BeforeWalltime Duration // checkpoint this long before the walltime; 0: no
	// Dir is where checkpoints go, with %u, %a, %p expanded ("_" if empty), and %j too
	// when the request had a job id (otherwise %j and %% are left for the
	// launcher).
	Dir     string
	Keep    int  // checkpoints kept
	MaxSize Size // largest checkpoint allowed; 0: no cap
}

// Enabled reports whether the VM is checkpointed at all.
func (c CheckpointSettings) Enabled() bool { return c.Interval > 0 || c.BeforeWalltime > 0 }

// MigrationSettings says whether the VM moves off nodes predicted to fail.
type MigrationSettings struct {
	Enabled       bool
	Predictors    []string
	RiskThreshold float64
	SpareNodes    int
}

// CgroupSettings limit the VMM processes on each node.
type CgroupSettings struct {
	CPUWeight       int
	CPUQuotaPercent int
	MemoryMax       Size // guest RAM plus VMM reserve unless a rule caps it
	MemoryHigh      Size
	PidsMax         int
	IOWeight        int
}

// Limit is one rule-imposed bound that was checked, for explain.
type Limit struct {
	Setting string
	Value   string
	Origin  Origin
}

// Explanation is the full story of one admission decision.
type Explanation struct {
	Effective *Effective
	Matched   []Origin // matching rules, highest precedence first
	Limits    []Limit  // bounds checked
	Refusals  []error  // *RefusedError, *RequestError or *ConflictError
}

// Err joins the refusals, or is nil when the request is admitted.
func (x *Explanation) Err() error { return errors.Join(x.Refusals...) }

// RefusedError is the policy saying no, naming the rule and setting.
type RefusedError struct {
	By      Origin // the deciding rule; Kind "" when no rule allows it
	Setting string // the policy key, e.g. "limits.max_mem_per_node"
	Detail  string // what the user asked and why it is refused
}

func (e *RefusedError) Error() string {
	if e.By.Kind == "rule" {
		return fmt.Sprintf("hpcvm: request refused by rule %q (%s:%d): %s", e.By.Rule, e.By.File, e.By.Line, e.Detail)
	}
	return "hpcvm: request refused: " + e.Detail
}

// ConflictError is the policy contradicting itself for this job, e.g. one
// rule's checkpoint interval below another's minimum. It is the site's
// problem, so the message says so.
type ConflictError struct {
	Setting string
	A, B    Origin
	Detail  string
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("hpcvm: site policy conflict, please report it to your administrators: %s (%s; %s)", e.Detail, e.A, e.B)
}

// Admit merges a request with the policy. It returns the effective settings,
// or an error joining one *RefusedError, *RequestError or *ConflictError
// per problem (use errors.As); each message is fit to show the user.
func (p *Policy) Admit(req Request) (*Effective, error) {
	x := p.decide(req, false)
	if err := x.Err(); err != nil {
		return nil, err
	}
	return x.Effective, nil
}

// matching lists the rules that apply to req, highest precedence first.
func (p *Policy) matching(req *Request) []*rule {
	cand := slices.Clone(p.index.scan)
	for d := range nDims {
		switch d {
		case dimGroup:
			for _, g := range req.Groups {
				cand = append(cand, p.index.byValue[d][g]...)
			}
		default:
			cand = append(cand, p.index.byValue[d][requestValue(req, d)]...)
		}
	}
	slices.Sort(cand)
	cand = slices.Compact(cand) // a rule listing two of the user's groups
	var m []*rule
	for _, rank := range cand {
		if r := p.rules[rank]; r.matches(req) {
			m = append(m, r)
		}
	}
	return m
}

func requestValue(req *Request, d dim) string {
	switch d {
	case dimPartition:
		return req.Partition
	case dimAccount:
		return req.Account
	case dimQOS:
		return req.QOS
	case dimUser:
		return req.User
	}
	return ""
}

func (r *rule) matches(req *Request) bool {
	for d := range nDims {
		if r.hasMatch[d] && !anyMatch(r.match[d], req, d) {
			return false
		}
		if len(r.except[d]) > 0 && anyMatch(r.except[d], req, d) {
			return false
		}
	}
	return true
}

// anyMatch: a job with no value for a key (no account, say) matches no
// pattern, not even "*".
func anyMatch(pats []glob, req *Request, d dim) bool {
	if d == dimGroup {
		for _, g := range req.Groups {
			if g != "" && slices.ContainsFunc(pats, func(p glob) bool { return p.match(g) }) {
				return true
			}
		}
		return false
	}
	v := requestValue(req, d)
	return v != "" && slices.ContainsFunc(pats, func(p glob) bool { return p.match(v) })
}

// pick finds the highest-precedence matching rule that sets a setting.
func pick[T any](m []*rule, get func(*bodyDoc) *opt[T]) (T, Origin, bool) {
	for _, r := range m {
		if o := get(r.body); o.set {
			return o.v, r.origin(o.line), true
		}
	}
	var zero T
	return zero, Origin{}, false
}

// overrideGrant decides whether users may loosen a setting: the
// highest-precedence matching rule that either sets it or names it in
// user_may_override has the last word.
func overrideGrant(m []*rule, setting string, isSet func(*bodyDoc) bool) (bool, Origin) {
	for _, r := range m {
		if line, ok := r.override[setting]; ok {
			return true, r.origin(line)
		}
		if isSet(r.body) {
			return false, Origin{}
		}
	}
	return false, Origin{}
}

// Explain merges a request with the policy like Admit, and also reports
// the rules that matched and the limits checked. The Effective settings are
// filled in as far as possible even when the request is refused.
func (p *Policy) Explain(req Request) *Explanation { return p.decide(req, true) }

// decide is Admit and Explain; detail fills in Matched and Limits, which
// only people read.
func (p *Policy) decide(req Request, detail bool) *Explanation {
	e := &Effective{JobID: req.JobID, User: req.User, Account: req.Account, Partition: req.Partition,
		QOS: req.QOS, Image: req.Image, Provenance: make(map[string]Origin, 24)}
	x := &Explanation{Effective: e}
	if err := req.Validate(); err != nil {
		x.Refusals = append(x.Refusals, err)
		return x
	}
	m := p.matching(&req)
	if detail {
		for _, r := range m {
			x.Matched = append(x.Matched, r.origin(0))
		}
	}
	a := &admission{x: x, e: e, m: m, req: &req, detail: detail}
	a.image()
	a.size()
	a.checkpoint()
	a.migration()
	a.cgroup()
	return x
}

// admission is the state of one Explain call.
type admission struct {
	x      *Explanation
	e      *Effective
	m      []*rule
	req    *Request
	detail bool
}

func (a *admission) refuse(by Origin, setting, format string, args ...any) {
	a.x.Refusals = append(a.x.Refusals, &RefusedError{By: by, Setting: setting, Detail: fmt.Sprintf(format, args...)})
}

func (a *admission) conflict(setting string, x, y Origin, format string, args ...any) {
	a.x.Refusals = append(a.x.Refusals, &ConflictError{Setting: setting, A: x, B: y, Detail: fmt.Sprintf(format, args...)})
}

func (a *admission) limit(setting string, v any, o Origin) {
	if !a.detail {
		return
	}
	a.x.Limits = append(a.x.Limits, Limit{Setting: setting, Value: fmt.Sprint(v), Origin: o})
}

func (a *admission) set(name string, o Origin) { a.e.Provenance[name] = o }

func (a *admission) image() {
	img := a.req.Image
	// Deny lists add up: any matching rule's deny refuses the image.
	for _, r := range a.m {
		d := &r.body.Images.Deny
		if !d.set {
			continue
		}
		for _, s := range d.v {
			if glob(s).match(img) {
				a.refuse(r.origin(d.line), "images.deny", "%s=%s is denied (images.deny contains %q)", optImage, img, s)
				return
			}
		}
	}
	allow, by, ok := pick(a.m, func(b *bodyDoc) *opt[[]string] { return &b.Images.Allow })
	if !ok {
		a.refuse(Origin{}, "images.allow", "%s=%s: no rule's images.allow applies to %s, so no image may run", optImage, img, a.jobDesc())
		return
	}
	a.limit("images.allow", strings.Join(allow, ", "), by)
	if !slices.ContainsFunc(allow, func(s string) bool { return glob(s).match(img) }) {
		if len(allow) == 0 {
			a.refuse(by, "images.allow", "%s=%s: no image may run here (images.allow is empty)", optImage, img)
		} else {
			a.refuse(by, "images.allow", "%s=%s is not allowed (images.allow = %s)", optImage, img, strings.Join(allow, ", "))
		}
		return
	}
	a.set("image", by)
}

// jobDesc names what the job matched on, for "nothing allows this" messages.
func (a *admission) jobDesc() string {
	var parts []string
	for _, f := range []struct{ k, v string }{{"partition", a.req.Partition}, {"account", a.req.Account}, {"qos", a.req.QOS}, {"user", a.req.User}} {
		if f.v != "" {
			parts = append(parts, f.k+" "+f.v)
		}
	}
	return "this job (" + strings.Join(parts, ", ") + ")"
}

func (a *admission) size() {
	e, req := a.e, a.req
	lim := func(b *bodyDoc) *limitsDoc { return &b.Limits }

	e.Nodes = req.Nodes
	a.set("nodes", fromRequest)
	if e.Nodes == 0 {
		e.Nodes = 1
		a.set("nodes", builtIn)
	}
	if mx, by, ok := pick(a.m, func(b *bodyDoc) *opt[int64] { return &lim(b).MaxNodes }); ok {
		a.limit("limits.max_nodes", mx, by)
		if int64(e.Nodes) > mx {
			a.refuse(by, "limits.max_nodes", "%s=%d exceeds limits.max_nodes = %d", optNodes, e.Nodes, mx)
		}
	}

	// vCPUs: per node from the request, else spread from the job total,
	// else the policy's default.
	cpuOpt := ""
	switch {
	case req.CPUsPerNode > 0:
		e.VCPUsPerNode = req.CPUsPerNode
		cpuOpt = fmt.Sprintf("%s=%d", optCPUsNode, req.CPUsPerNode)
		a.set("vcpus_per_node", fromRequest)
	case req.CPUs > 0:
		e.VCPUsPerNode = (req.CPUs + e.Nodes - 1) / e.Nodes
		cpuOpt = fmt.Sprintf("%s=%d on %d node(s)", optCPUs, req.CPUs, e.Nodes)
		a.set("vcpus_per_node", computed)
	default:
		d, by, ok := pick(a.m, func(b *bodyDoc) *opt[int64] { return &lim(b).DefaultCPUsPerNode })
		if !ok {
			d, by = DefaultCPUsPerNode, builtIn
		}
		e.VCPUsPerNode = int(d)
		a.set("vcpus_per_node", by)
	}
	e.VCPUs = e.VCPUsPerNode * e.Nodes
	a.set("vcpus", computed)
	if req.CPUs > 0 {
		e.VCPUs = req.CPUs
		a.set("vcpus", fromRequest)
	}
	if mx, by, ok := pick(a.m, func(b *bodyDoc) *opt[int64] { return &lim(b).MaxCPUsPerNode }); ok {
		a.limit("limits.max_cpus_per_node", mx, by)
		if int64(e.VCPUsPerNode) > mx {
			if cpuOpt == "" {
				a.conflict("limits.max_cpus_per_node", e.Provenance["vcpus_per_node"], by,
					"default of %d vCPUs per node exceeds limits.max_cpus_per_node = %d", e.VCPUsPerNode, mx)
			} else {
				a.refuse(by, "limits.max_cpus_per_node", "%s puts %d vCPUs on a node, above limits.max_cpus_per_node = %d", cpuOpt, e.VCPUsPerNode, mx)
			}
		}
	}
	if mx, by, ok := pick(a.m, func(b *bodyDoc) *opt[int64] { return &lim(b).MaxCPUsPerJob }); ok {
		a.limit("limits.max_cpus_per_job", mx, by)
		if int64(e.VCPUs) > mx {
			what := cpuOpt
			if what == "" {
				what = fmt.Sprintf("the default %d vCPUs per node on %d node(s)", e.VCPUsPerNode, e.Nodes)
			}
			a.refuse(by, "limits.max_cpus_per_job", "%s makes %d vCPUs, above limits.max_cpus_per_job = %d", what, e.VCPUs, mx)
		}
	}

	memOpt := ""
	if req.MemPerNode > 0 {
		e.MemPerNode = req.MemPerNode
		memOpt = fmt.Sprintf("%s=%v", optMem, req.MemPerNode)
		a.set("mem_per_node", fromRequest)
	} else if d, by, ok := pick(a.m, func(b *bodyDoc) *opt[Size] { return &lim(b).DefaultMemPerNode }); ok {
		e.MemPerNode = d
		a.set("mem_per_node", by)
	} else {
		a.refuse(Origin{}, "limits.default_mem_per_node", "no memory size: give %s (no rule sets limits.default_mem_per_node for %s)", optMem, a.jobDesc())
	}
	if mx, by, ok := pick(a.m, func(b *bodyDoc) *opt[Size] { return &lim(b).MaxMemPerNode }); ok {
		a.limit("limits.max_mem_per_node", mx, by)
		if e.MemPerNode > mx {
			if memOpt == "" {
				a.conflict("limits.max_mem_per_node", e.Provenance["mem_per_node"], by,
					"default of %v per node exceeds limits.max_mem_per_node = %v", e.MemPerNode, mx)
			} else {
				a.refuse(by, "limits.max_mem_per_node", "%s exceeds limits.max_mem_per_node = %v", memOpt, mx)
			}
		}
	}
	if mx, by, ok := pick(a.m, func(b *bodyDoc) *opt[Size] { return &lim(b).MaxMemPerJob }); ok {
		a.limit("limits.max_mem_per_job", mx, by)
		if total := e.MemPerNode * Size(e.Nodes); e.MemPerNode > 0 && (total > mx || total/Size(e.Nodes) != e.MemPerNode) {
			what := memOpt
			if what == "" {
				what = fmt.Sprintf("the default %v per node", e.MemPerNode)
			}
			a.refuse(by, "limits.max_mem_per_job", "%s on %d node(s) makes %v, above limits.max_mem_per_job = %v", what, e.Nodes, total, mx)
		}
	}

	if r, by, ok := pick(a.m, func(b *bodyDoc) *opt[Size] { return &lim(b).VMMReservePerNode }); ok {
		e.VMMReservePerNode = r
		a.set("vmm_mem_reserve_per_node", by)
	} else {
		e.VMMReservePerNode = DefaultVMMReserve
		a.set("vmm_mem_reserve_per_node", builtIn)
	}
	e.Walltime = req.Walltime
	a.set("walltime", fromRequest)
}

func (a *admission) checkpoint() {
	e, req, c := a.e, a.req, &a.e.Checkpoint
	ck := func(b *bodyDoc) *checkpointDoc { return &b.Checkpoint }

	// Interval: shorter is tighter and always allowed; longer or "off"
	// only where a rule grants checkpoint.interval in user_may_override.
	pol, polBy, polSet := pick(a.m, func(b *bodyDoc) *opt[offDuration] { return &ck(b).Interval })
	c.Interval = Duration(pol)
	a.set("checkpoint.interval", polBy)
	if !polSet {
		a.set("checkpoint.interval", builtIn)
	}
	if w := req.CheckpointInterval; w.Set {
		grant, grantBy := overrideGrant(a.m, "checkpoint.interval", func(b *bodyDoc) bool { return ck(b).Interval.set })
		if grant {
			a.limit("user_may_override checkpoint.interval", "granted", grantBy)
		}
		tighter := w.Value > 0 && (c.Interval == 0 || w.Value <= c.Interval)
		switch {
		case tighter || grant:
			c.Interval = w.Value
			a.set("checkpoint.interval", fromRequest)
		case w.Value == 0:
			a.refuse(polBy, "checkpoint.interval", "%s=off is not allowed: checkpoint.interval = %v is required", optInterval, c.Interval)
		default:
			a.refuse(polBy, "checkpoint.interval", "%s=%v is longer than checkpoint.interval = %v (you may only checkpoint more often)", optInterval, w.Value, c.Interval)
		}
	}
	if mn, by, ok := pick(a.m, func(b *bodyDoc) *opt[Duration] { return &ck(b).MinInterval }); ok {
		a.limit("checkpoint.min_interval", mn, by)
		if c.Interval > 0 && c.Interval < mn {
			if e.Provenance["checkpoint.interval"] == fromRequest {
				a.refuse(by, "checkpoint.min_interval", "%s=%v is shorter than checkpoint.min_interval = %v", optInterval, c.Interval, mn)
			} else {
				a.conflict("checkpoint.min_interval", polBy, by, "checkpoint.interval = %v is below checkpoint.min_interval = %v", c.Interval, mn)
			}
		}
	}

	// Before walltime: an earlier checkpoint (longer lead) is tighter.
	lead, leadBy, leadSet := pick(a.m, func(b *bodyDoc) *opt[offDuration] { return &ck(b).BeforeWalltime })
	c.BeforeWalltime = Duration(lead)
	a.set("checkpoint.before_walltime", leadBy)
	if !leadSet {
		a.set("checkpoint.before_walltime", builtIn)
	}
	if w := req.CheckpointAtWalltime; w.Wish != WishUnset {
		grant, grantBy := overrideGrant(a.m, "checkpoint.before_walltime", func(b *bodyDoc) bool { return ck(b).BeforeWalltime.set })
		if grant {
			a.limit("user_may_override checkpoint.before_walltime", "granted", grantBy)
		}
		switch {
		case w.Wish == WishNo && c.BeforeWalltime > 0 && !grant:
			a.refuse(leadBy, "checkpoint.before_walltime", "%s=no is not allowed: checkpoint.before_walltime = %v is required", optAtWalltime, c.BeforeWalltime)
		case w.Wish == WishNo:
			c.BeforeWalltime = 0
			a.set("checkpoint.before_walltime", fromRequest)
		case w.Lead == 0 && c.BeforeWalltime == 0:
			c.BeforeWalltime = DefaultBeforeWalltime
			a.set("checkpoint.before_walltime", fromRequest)
		case w.Lead == 0:
			// "yes" where the policy already checkpoints: nothing changes.
		case w.Lead < c.BeforeWalltime && !grant:
			a.refuse(leadBy, "checkpoint.before_walltime", "%s=%v is later than checkpoint.before_walltime = %v (you may only ask for an earlier checkpoint)", optAtWalltime, w.Lead, c.BeforeWalltime)
		default:
			c.BeforeWalltime = w.Lead
			a.set("checkpoint.before_walltime", fromRequest)
		}
	}
	if c.BeforeWalltime > 0 && e.Walltime > 0 && c.BeforeWalltime >= e.Walltime {
		e.Warnings = append(e.Warnings, fmt.Sprintf("%s=%v is not longer than the %v checkpoint lead: there is no time to checkpoint before the walltime", optWalltime, e.Walltime, c.BeforeWalltime))
	}

	dir, dirBy, dirSet := pick(a.m, func(b *bodyDoc) *opt[string] { return &ck(b).Dir })
	c.Dir = expandDir(dir, req)
	a.set("checkpoint.dir", dirBy)
	if !dirSet {
		a.set("checkpoint.dir", builtIn)
	}
	keep, keepBy, ok := pick(a.m, func(b *bodyDoc) *opt[int64] { return &ck(b).Keep })
	if !ok {
		keep, keepBy = DefaultKeep, builtIn
	}
	c.Keep = int(keep)
	a.set("checkpoint.keep", keepBy)
	mx, mxBy, mxSet := pick(a.m, func(b *bodyDoc) *opt[Size] { return &ck(b).MaxSize })
	c.MaxSize = mx
	a.set("checkpoint.max_size", mxBy)
	if !mxSet {
		a.set("checkpoint.max_size", builtIn)
	}

	if !c.Enabled() {
		return
	}
	// Who turned checkpointing on decides who is told about what is missing.
	why := e.Provenance["checkpoint.interval"]
	if c.Interval == 0 {
		why = e.Provenance["checkpoint.before_walltime"]
	}
	if !dirSet {
		if why.Kind == "rule" {
			a.conflict("checkpoint.dir", why, Origin{}, "checkpoints are required but no rule sets checkpoint.dir")
		} else {
			a.refuse(Origin{}, "checkpoint.dir", "you asked for checkpoints (%s), but no rule sets checkpoint.dir for %s", a.ckptOpts(), a.jobDesc())
		}
	}
	if mxSet && e.MemPerNode > 0 {
		a.limit("checkpoint.max_size", mx, mxBy)
		total := e.MemPerNode * Size(e.Nodes)
		if total > mx || total/Size(e.Nodes) != e.MemPerNode {
			a.refuse(mxBy, "checkpoint.max_size", "%s=%v on %d node(s) makes checkpoints of up to %v, above checkpoint.max_size = %v", optMem, e.MemPerNode, e.Nodes, total, mx)
		}
	}
}

func (a *admission) ckptOpts() string {
	var s []string
	if a.req.CheckpointInterval.Set {
		s = append(s, fmt.Sprintf("%s=%v", optInterval, a.req.CheckpointInterval))
	}
	if a.req.CheckpointAtWalltime.Wish != WishUnset {
		s = append(s, fmt.Sprintf("%s=%v", optAtWalltime, a.req.CheckpointAtWalltime))
	}
	return strings.Join(s, " ")
}

// expandDir fills in the checkpoint directory's escapes; an empty account
// or partition becomes "_". Without a job id, %j and %% are left for the
// launcher to expand.
func expandDir(dir string, req *Request) string {
	if !strings.Contains(dir, "%") {
		return dir
	}
	var b strings.Builder
	for i := 0; i < len(dir); i++ {
		if dir[i] != '%' || i+1 == len(dir) {
			b.WriteByte(dir[i])
			continue
		}
		i++
		switch dir[i] {
		case 'u':
			b.WriteString(orUnderscore(req.User))
		case 'a':
			b.WriteString(orUnderscore(req.Account))
		case 'p':
			b.WriteString(orUnderscore(req.Partition))
		case 'j', '%':
			switch {
			case req.JobID == "":
				b.WriteString(dir[i-1 : i+1])
			case dir[i] == 'j':
				b.WriteString(req.JobID)
			default:
				b.WriteByte('%')
			}
		default:
			b.WriteString(dir[i-1 : i+1])
		}
	}
	return b.String()
}

// orUnderscore keeps a missing account or partition from collapsing two
// directory levels into one ("/ckpt//bob").
func orUnderscore(s string) string {
	if s == "" {
		return "_"
	}
	return s
}

func (a *admission) migration() {
	e, req, mg := a.e, a.req, &a.e.Migration
	mig := func(b *bodyDoc) *migrationDoc { return &b.Migration }

	en, enBy, enSet := pick(a.m, func(b *bodyDoc) *opt[bool] { return &mig(b).Enabled })
	mg.Enabled = en
	a.set("migration.enabled", enBy)
	if !enSet {
		a.set("migration.enabled", builtIn)
	}
	switch req.Migration {
	case WishYes:
		// Asking for more protection is always allowed.
		mg.Enabled = true
		a.set("migration.enabled", fromRequest)
	case WishNo:
		grant, grantBy := overrideGrant(a.m, "migration.enabled", func(b *bodyDoc) bool { return mig(b).Enabled.set })
		if grant {
			a.limit("user_may_override migration.enabled", "granted", grantBy)
		}
		if mg.Enabled && !grant {
			a.refuse(enBy, "migration.enabled", "%s=no is not allowed: migration.enabled = true", optMigration)
		} else {
			mg.Enabled = false
			a.set("migration.enabled", fromRequest)
		}
	}

	pred, predBy, predSet := pick(a.m, func(b *bodyDoc) *opt[[]string] { return &mig(b).Predictors })
	mg.Predictors = slices.Clone(pred)
	a.set("migration.predictors", predBy)
	if !predSet {
		a.set("migration.predictors", builtIn)
	}
	risk, riskBy, ok := pick(a.m, func(b *bodyDoc) *opt[float64] { return &mig(b).RiskThreshold })
	if !ok {
		risk, riskBy = DefaultRiskThreshold, builtIn
	}
	mg.RiskThreshold = risk
	a.set("migration.risk_threshold", riskBy)
	spare, spareBy, ok := pick(a.m, func(b *bodyDoc) *opt[int64] { return &mig(b).SpareNodes })
	if !ok {
		spareBy = builtIn
	}
	mg.SpareNodes = int(spare)
	a.set("migration.spare_nodes", spareBy)

	if mg.Enabled && len(mg.Predictors) == 0 {
		if e.Provenance["migration.enabled"] == fromRequest {
			a.refuse(predBy, "migration.predictors", "%s=yes: no failure predictor is configured for %s (migration.predictors is empty)", optMigration, a.jobDesc())
		} else {
			a.conflict("migration.predictors", enBy, predBy, "migration.enabled = true but migration.predictors is empty")
		}
	}
}

func (a *admission) cgroup() {
	e, cg := a.e, &a.e.Cgroup
	grp := func(b *bodyDoc) *cgroupDoc { return &b.Cgroup }
	for _, f := range []struct {
		name string
		dst  *int
		get  func(*bodyDoc) *opt[int64]
	}{
		{"cgroup.cpu_weight", &cg.CPUWeight, func(b *bodyDoc) *opt[int64] { return &grp(b).CPUWeight }},
		{"cgroup.cpu_quota_percent", &cg.CPUQuotaPercent, func(b *bodyDoc) *opt[int64] { return &grp(b).CPUQuotaPercent }},
		{"cgroup.pids_max", &cg.PidsMax, func(b *bodyDoc) *opt[int64] { return &grp(b).PidsMax }},
		{"cgroup.io_weight", &cg.IOWeight, func(b *bodyDoc) *opt[int64] { return &grp(b).IOWeight }},
	} {
		v, by, ok := pick(a.m, f.get)
		if !ok {
			by = builtIn
		}
		*f.dst = int(v)
		a.set(f.name, by)
	}

	// The VMM's cgroup holds the guest's RAM too, so it needs at least
	// RAM plus reserve; a rule's memory_max below that can never work.
	need := e.MemPerNode + e.VMMReservePerNode
	if mx, by, ok := pick(a.m, func(b *bodyDoc) *opt[Size] { return &grp(b).MemoryMax }); ok {
		cg.MemoryMax = mx
		a.set("cgroup.memory_max", by)
		a.limit("cgroup.memory_max", mx, by)
		if need > mx && e.MemPerNode > 0 {
			if e.Provenance["mem_per_node"] == fromRequest {
				a.refuse(by, "cgroup.memory_max", "%s=%v plus the VMM reserve of %v needs %v per node, above cgroup.memory_max = %v",
					optMem, e.MemPerNode, e.VMMReservePerNode, need, mx)
			} else {
				a.conflict("cgroup.memory_max", e.Provenance["mem_per_node"], by,
					"the default memory %v plus the VMM reserve %v is above cgroup.memory_max = %v", e.MemPerNode, e.VMMReservePerNode, mx)
			}
		}
	} else {
		cg.MemoryMax = need
		a.set("cgroup.memory_max", computed)
	}
	hi, hiBy, ok := pick(a.m, func(b *bodyDoc) *opt[Size] { return &grp(b).MemoryHigh })
	cg.MemoryHigh = hi
	a.set("cgroup.memory_high", hiBy)
	if !ok {
		a.set("cgroup.memory_high", builtIn)
	} else if hi < need && e.MemPerNode > 0 {
		e.Warnings = append(e.Warnings, fmt.Sprintf("cgroup.memory_high = %v is below the %v the VM needs per node: the VMM will be throttled", hi, need))
	}
}

// Settings lists the names used in Effective.Provenance, in display order.
func Settings() []string {
	return []string{"image", "nodes", "vcpus", "vcpus_per_node", "mem_per_node", "vmm_mem_reserve_per_node", "walltime",
		"checkpoint.interval", "checkpoint.before_walltime", "checkpoint.dir", "checkpoint.keep", "checkpoint.max_size",
		"migration.enabled", "migration.predictors", "migration.risk_threshold", "migration.spare_nodes",
		"cgroup.cpu_weight", "cgroup.cpu_quota_percent", "cgroup.memory_max", "cgroup.memory_high", "cgroup.pids_max", "cgroup.io_weight"}
}

// Value renders one setting of e for people; "" for unknown names.
func (e *Effective) Value(setting string) string {
	c, m, g := &e.Checkpoint, &e.Migration, &e.Cgroup
	num := func(n int) string {
		if n == 0 {
			return "unset"
		}
		return strconv.Itoa(n)
	}
	size := func(s Size) string {
		if s == 0 {
			return "unset"
		}
		return s.String()
	}
	dur := func(d Duration) string {
		if d == 0 {
			return "off"
		}
		return d.String()
	}
	switch setting {
	case "image":
		return e.Image
	case "nodes":
		return strconv.Itoa(e.Nodes)
	case "vcpus":
		return strconv.Itoa(e.VCPUs)
	case "vcpus_per_node":
		return strconv.Itoa(e.VCPUsPerNode)
	case "mem_per_node":
		return size(e.MemPerNode)
	case "vmm_mem_reserve_per_node":
		return e.VMMReservePerNode.String()
	case "walltime":
		if e.Walltime == 0 {
			return "unknown"
		}
		return e.Walltime.String()
	case "checkpoint.interval":
		return dur(c.Interval)
	case "checkpoint.before_walltime":
		return dur(c.BeforeWalltime)
	case "checkpoint.dir":
		if c.Dir == "" {
			return "unset"
		}
		return c.Dir
	case "checkpoint.keep":
		return strconv.Itoa(c.Keep)
	case "checkpoint.max_size":
		return size(c.MaxSize)
	case "migration.enabled":
		return strconv.FormatBool(m.Enabled)
	case "migration.predictors":
		if len(m.Predictors) == 0 {
			return "none"
		}
		return strings.Join(m.Predictors, ", ")
	case "migration.risk_threshold":
		return strconv.FormatFloat(m.RiskThreshold, 'g', -1, 64)
	case "migration.spare_nodes":
		return strconv.Itoa(m.SpareNodes)
	case "cgroup.cpu_weight":
		return num(g.CPUWeight)
	case "cgroup.cpu_quota_percent":
		return num(g.CPUQuotaPercent)
	case "cgroup.memory_max":
		return size(g.MemoryMax)
	case "cgroup.memory_high":
		return size(g.MemoryHigh)
	case "cgroup.pids_max":
		return num(g.PidsMax)
	case "cgroup.io_weight":
		return num(g.IOWeight)
	}
	return ""
}
