package policies

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// File is one policy file's name (used in every message) and contents.
type File struct {
	Name string
	Data []byte
}

// Severity says whether a Problem stops a policy from loading.
type Severity int

const (
	// SevError makes the policy unusable: Load refuses it.
	SevError Severity = iota
	// SevWarning marks dead or suspicious configuration (a rule that can
	// never match, an allow list that is entirely denied). Load accepts it;
	// `hpcvm policy check` still reports it and fails.
	SevWarning
)

func (s Severity) String() string {
	if s == SevWarning {
		return "warning"
	}
	return "error"
}

// Problem is one defect in a policy file.
type Problem struct {
	File     string
	Line     int    // 0 when unknown (then the message names the key)
	Rule     string // rule name, "defaults", or "" for file-level problems
	Key      string // dotted key within the rule, e.g. "limits.max_nodes"
	Msg      string
	Severity Severity
}

func (p *Problem) Error() string {
	var b strings.Builder
	b.WriteString(p.File)
	if p.Line > 0 {
		b.WriteString(":" + strconv.Itoa(p.Line))
	}
	b.WriteString(": ")
	if p.Severity == SevWarning {
		b.WriteString("warning: ")
	}
	if p.Rule != "" {
		fmt.Fprintf(&b, "rule %q: ", p.Rule)
	}
	if p.Key != "" {
		b.WriteString(p.Key + ": ")
	}
	b.WriteString(p.Msg)
	return b.String()
}

// LoadError lists every error-severity problem that stopped a policy from
// loading. errors.As finds each *Problem through Unwrap.
type LoadError struct {
	Problems []*Problem
}

func (e *LoadError) Error() string {
	msgs := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		msgs[i] = p.Error()
	}
	return strings.Join(msgs, "\n")
}

// Unwrap exposes the problems to errors.Is and errors.As.
func (e *LoadError) Unwrap() []error {
	out := make([]error, len(e.Problems))
	for i, p := range e.Problems {
		out[i] = p
	}
	return out
}

// ReadFiles reads policy files. A directory stands for the files named
// *.toml directly inside it, in lexical order; names starting with '.' are
// skipped (editor and package-manager leftovers). The result keeps the
// order of paths, which is the precedence order (later wins).
func ReadFiles(paths ...string) ([]File, error) {
	var files []File
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("reading policy: %w", err)
		}
		if !st.IsDir() {
			data, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("reading policy: %w", err)
			}
			files = append(files, File{Name: p, Data: data})
			continue
		}
		ents, err := os.ReadDir(p) // sorted by name
		if err != nil {
			return nil, fmt.Errorf("reading policy directory: %w", err)
		}
		n := 0
		for _, e := range ents {
			if e.IsDir() || strings.HasPrefix(e.Name(), ".") || !strings.HasSuffix(e.Name(), ".toml") {
				continue
			}
			name := filepath.Join(p, e.Name())
			data, err := os.ReadFile(name)
			if err != nil {
				return nil, fmt.Errorf("reading policy: %w", err)
			}
			files = append(files, File{Name: name, Data: data})
			n++
		}
		if n == 0 {
			return nil, fmt.Errorf("policy directory %s: %w", p, errNoFiles)
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("policy: %w", errNoFiles)
	}
	return files, nil
}

var errNoFiles = errors.New("no *.toml policy files")

// Load reads and compiles policy files and directories (see ReadFiles).
// It fails with a *LoadError if any file has an error; warnings do not stop
// it and are available from Policy.Warnings.
func Load(paths ...string) (*Policy, error) {
	files, err := ReadFiles(paths...)
	if err != nil {
		return nil, err
	}
	return Parse(files...)
}

// Parse compiles policy files given in precedence order (later wins).
func Parse(files ...File) (*Policy, error) {
	p, problems := Compile(files...)
	if p == nil {
		var errs []*Problem
		for _, pr := range problems {
			if pr.Severity == SevError {
				errs = append(errs, pr)
			}
		}
		return nil, &LoadError{Problems: errs}
	}
	return p, nil
}

// Compile checks policy files and returns every problem found, errors and
// warnings, in file order. The policy is nil if there is any error.
func Compile(files ...File) (*Policy, []*Problem) {
	c := &compiler{names: map[string]*rule{}, known: schemaKeys(),
		bodyLeaves: leafIndexes(reflect.TypeFor[bodyDoc]()), siteLeaves: leafIndexes(reflect.TypeFor[siteDoc]())}
	for i, f := range files {
		c.file(i, f)
	}
	c.crossChecks()
	// Cross-file checks come last; report in file and line order.
	order := map[string]int{}
	for i, f := range files {
		if _, seen := order[f.Name]; !seen {
			order[f.Name] = i
		}
	}
	slices.SortStableFunc(c.problems, func(a, b *Problem) int {
		if d := order[a.File] - order[b.File]; d != 0 {
			return d
		}
		return a.Line - b.Line
	})
	var hasErr bool
	for _, p := range c.problems {
		hasErr = hasErr || p.Severity == SevError
	}
	if hasErr {
		return nil, c.problems
	}
	rules := slices.Clone(c.rules)
	// Highest precedence first: later file, then more matcher keys, then
	// later in the file.
	sort.SliceStable(rules, func(i, j int) bool {
		a, b := rules[i], rules[j]
		if a.fileIx != b.fileIx {
			return a.fileIx > b.fileIx
		}
		if a.spec != b.spec {
			return a.spec > b.spec
		}
		return a.pos > b.pos
	})
	p := &Policy{rules: rules, index: indexRules(rules)}
	for _, f := range files {
		p.files = append(p.files, f.Name)
	}
	for _, pr := range c.problems {
		if pr.Severity == SevWarning {
			p.warnings = append(p.warnings, pr)
		}
	}
	return p, c.problems
}

// Policy is a compiled, validated set of policy files. It is immutable and
// safe for concurrent use.
type Policy struct {
	files    []string
	rules    []*rule // highest precedence first
	index    ruleIndex
	warnings []*Problem
}

// ruleIndex finds candidate rules without trying all of them: a rule whose
// matcher on some key lists only literal names is filed under those names;
// the rest are always tried. Entries are positions in Policy.rules, so
// sorting candidates restores precedence order.
type ruleIndex struct {
	byValue [nDims]map[string][]int32
	scan    []int32
}

// indexOrder prefers the keys that split jobs most finely.
var indexOrder = [...]dim{dimUser, dimAccount, dimGroup, dimPartition, dimQOS}

func indexRules(rules []*rule) ruleIndex {
	var ix ruleIndex
	for d := range nDims {
		ix.byValue[d] = map[string][]int32{}
	}
next:
	for rank, r := range rules {
		for _, d := range indexOrder {
			if !r.hasMatch[d] {
				continue
			}
			if !slices.ContainsFunc(r.match[d], func(g glob) bool { return !g.literal() }) {
				// An empty list files the rule nowhere: it never matches.
				for _, g := range r.match[d] {
					ix.byValue[d][string(g)] = append(ix.byValue[d][string(g)], int32(rank))
				}
				continue next
			}
		}
		ix.scan = append(ix.scan, int32(rank))
	}
	return ix
}

// Files lists the policy's files in precedence order (last wins).
func (p *Policy) Files() []string { return slices.Clone(p.files) }

// Warnings lists the warning-severity problems found while loading.
func (p *Policy) Warnings() []*Problem { return slices.Clone(p.warnings) }

// NumRules counts rules, including each file's [defaults].
func (p *Policy) NumRules() int { return len(p.rules) }

// dim is one thing a rule can match on.
type dim int

const (
	dimPartition dim = iota
	dimAccount
	dimQOS
	dimUser
	dimGroup
	nDims
)

var dimNames = [nDims]string{"partition", "account", "qos", "user", "group"}

// rule is a compiled [[rule]] or [defaults] table.
type rule struct {
	name      string
	file      string
	fileIx    int
	pos       int // index in its file; [defaults] is -1 so its rules beat it
	line      int
	spec      int // number of matcher keys: more specific rules win
	match     [nDims][]glob
	hasMatch  [nDims]bool
	matchLine [nDims]int
	except    [nDims][]glob
	body      *bodyDoc
	override  map[string]int // field a user may override -> line granting it
}

// global reports whether the rule applies to every job.
func (r *rule) global() bool {
	for d := range nDims {
		if r.hasMatch[d] || len(r.except[d]) > 0 {
			return false
		}
	}
	return true
}

// overridable lists the settings user_may_override may name: those a user
// can ask for. Limits are not among them: a limit users may override is no
// limit; raise it for the jobs concerned instead.
var overridable = []string{"checkpoint.interval", "checkpoint.before_walltime", "migration.enabled"}

type compiler struct {
	known      map[string]bool // every key of the schema
	bodyLeaves []leafIndex
	siteLeaves []leafIndex
	problems   []*Problem
	rules      []*rule
	names      map[string]*rule
	site       []siteInfo
}

type siteInfo struct {
	file       string
	partitions opt[[]string]
	qos        opt[[]string]
}

func (c *compiler) add(p *Problem) { c.problems = append(c.problems, p) }

// decodeErrMsg picks apart the TOML decoder's untyped errors:
// `toml: line 3 (last key "rule.images"): type mismatch ...`.
var typeMismatch = regexp.MustCompile(`^type mismatch for [^:]*: expected (\w+) but found (.*)$`)

var decodeErrMsg = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

func (c *compiler) file(ix int, f File) {
	var doc fileDoc
	md, err := toml.Decode(string(f.Data), &doc)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			c.add(&Problem{File: f.Name, Line: pe.Position.Line, Key: pe.LastKey, Msg: "TOML syntax: " + pe.Message})
			return
		}
		// Table-shape mismatches ("images = 3") come as plain errors that
		// carry the line and key only in their text.
		p := &Problem{File: f.Name, Msg: err.Error()}
		if m := decodeErrMsg.FindStringSubmatch(err.Error()); m != nil {
			p.Line, _ = strconv.Atoi(m[1])
			p.Key = m[2]
			p.Msg = m[3]
			// Speak TOML, not Go: "type mismatch for policies.imagesDoc:
			// expected table but found int64" -> "want a table, got integer".
			if t := typeMismatch.FindStringSubmatch(p.Msg); t != nil {
				got := strings.NewReplacer("int64", "integer", "float64", "float", "bool", "boolean", "[]interface {}", "array", "[]any", "array").Replace(t[2])
				p.Msg = fmt.Sprintf("want a %s, got %s", t[1], got)
			}
		}
		c.add(p)
		return
	}
	lines := keyLines(string(f.Data))
	ruleName := func(i int) string {
		if i >= 0 && i < len(doc.Rules) && doc.Rules[i].Name.set && doc.Rules[i].Name.err == nil {
			return doc.Rules[i].Name.v
		}
		return fmt.Sprintf("#%d", i+1)
	}
	c.unknownKeys(f.Name, md, lines, ruleName)

	if doc.Site.Partitions.set || doc.Site.QOS.set {
		for _, l := range leaves(&doc.Site, c.siteLeaves) {
			l.opt.line = lines["site."+l.key]
			c.convErr(f.Name, "", "site."+l.key, l.opt)
		}
		c.site = append(c.site, siteInfo{file: f.Name, partitions: doc.Site.Partitions, qos: doc.Site.QOS})
	}
	if doc.Defaults != nil {
		r := &rule{name: "defaults", file: f.Name, fileIx: ix, pos: -1, line: lines["defaults"], body: doc.Defaults}
		c.body(r, "defaults", lines)
		c.rules = append(c.rules, r)
	}
	for i := range doc.Rules {
		rd := &doc.Rules[i]
		path := "rule." + strconv.Itoa(i)
		r := &rule{file: f.Name, fileIx: ix, pos: i, line: lines[path], body: &rd.bodyDoc, name: ruleName(i)}
		rd.Name.line = lines[path+".name"]
		c.convErr(f.Name, r.name, "name", &rd.Name.optBase)
		switch {
		case !rd.Name.set:
			c.add(&Problem{File: f.Name, Line: r.line, Rule: r.name, Key: "name",
				Msg: "missing: every rule needs a name so refusals can cite it"})
		case rd.Name.err == nil && strings.TrimSpace(rd.Name.v) == "":
			c.add(&Problem{File: f.Name, Line: rd.Name.line, Rule: r.name, Key: "name", Msg: "empty"})
		case rd.Name.err == nil && r.name == "defaults":
			c.add(&Problem{File: f.Name, Line: rd.Name.line, Rule: r.name, Key: "name",
				Msg: `"defaults" is reserved for the [defaults] table`})
		case rd.Name.err == nil:
			if prev, dup := c.names[r.name]; dup {
				c.add(&Problem{File: f.Name, Line: rd.Name.line, Rule: r.name, Key: "name",
					Msg: fmt.Sprintf("duplicate rule name; also used at %s:%d", prev.file, prev.line)})
			} else {
				c.names[r.name] = r
			}
		}
		c.matchers(r, rd, path, lines)
		c.body(r, path, lines)
		c.rules = append(c.rules, r)
	}
}

// unknownKeys reports keys the schema does not have. Undecoded() lists
// them, and keys matched only case-insensitively are added because the
// decoder accepts "Max_Nodes" for "max_nodes" but an admin would not expect
// that to work elsewhere.
func (c *compiler) unknownKeys(file string, md toml.MetaData, lines map[string]int, ruleName func(int) string) {
	known := c.known
	undecoded := map[string]bool{}
	for _, k := range md.Undecoded() {
		undecoded[k.String()] = true
	}
	ruleIx := -1
	var reported []string
	for _, k := range md.Keys() {
		if len(k) == 1 && k[0] == "rule" {
			ruleIx++
		}
		plain := strings.Join(k, ".")
		if !undecoded[k.String()] && known[plain] {
			continue
		}
		if slices.ContainsFunc(reported, func(p string) bool { return strings.HasPrefix(plain, p+".") }) {
			continue // inside an unknown table already reported
		}
		reported = append(reported, plain)
		p := &Problem{File: file, Msg: "unknown key " + strconv.Quote(k[len(k)-1])}
		var pathKey string
		switch {
		case k[0] == "rule" && len(k) > 1:
			p.Rule = ruleName(ruleIx)
			p.Key = strings.Join(k[1:], ".")
			pathKey = "rule." + strconv.Itoa(ruleIx) + "." + p.Key
		case k[0] == "defaults" && len(k) > 1:
			p.Rule = "defaults"
			p.Key = strings.Join(k[1:], ".")
			pathKey = plain
		default:
			p.Key = plain
			pathKey = plain
		}
		p.Line = lines[pathKey]
		if s := suggest(plain, known); s != "" {
			p.Msg += fmt.Sprintf(" (did you mean %q?)", s)
		}
		c.add(p)
	}
}

// suggest finds the known key closest to an unknown one, if any is close.
func suggest(key string, known map[string]bool) string {
	parent, last := "", key
	if i := strings.LastIndexByte(key, '.'); i >= 0 {
		parent, last = key[:i], key[i+1:]
	}
	best, bestD := "", 3
	for k := range known {
		kp, kl := "", k
		if i := strings.LastIndexByte(k, '.'); i >= 0 {
			kp, kl = k[:i], k[i+1:]
		}
		if kp != parent {
			continue
		}
		if d := editDistance(strings.ToLower(last), kl); d < bestD || (d == bestD && kl < best) {
			best, bestD = kl, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// convErr reports a value that had the wrong type or did not parse.
func (c *compiler) convErr(file, rule, key string, o *optBase) {
	if o.set && o.err != nil {
		c.add(&Problem{File: file, Line: o.line, Rule: rule, Key: key, Msg: o.err.Error()})
	}
}

func (c *compiler) matchers(r *rule, rd *ruleDoc, path string, lines map[string]int) {
	for _, part := range []struct {
		name string
		m    *matchDoc
		dst  *[nDims][]glob
	}{{"match", &rd.Match, &r.match}, {"except", &rd.Except, &r.except}} {
		for d, o := range part.m.byDim() {
			key := part.name + "." + dimNames[d]
			o.line = lines[path+"."+key]
			if !o.set {
				continue
			}
			if o.err != nil {
				c.convErr(r.file, r.name, key, &o.optBase)
				continue
			}
			if part.name == "match" {
				r.hasMatch[d] = true
				r.matchLine[d] = o.line
				r.spec++
				if len(o.v) == 0 {
					c.add(&Problem{File: r.file, Line: o.line, Rule: r.name, Key: key, Severity: SevWarning,
						Msg: "empty list: the rule can never match"})
				}
			}
			for _, s := range o.v {
				if err := validGlob(s); err != nil {
					c.add(&Problem{File: r.file, Line: o.line, Rule: r.name, Key: key, Msg: err.Error()})
					continue
				}
				part.dst[d] = append(part.dst[d], glob(s))
			}
		}
	}
	// A key required to match what it is also required not to match.
	for d := range nDims {
		if len(r.match[d]) == 0 || len(r.except[d]) == 0 {
			continue
		}
		if allCovered(r.match[d], r.except[d]) {
			c.add(&Problem{File: r.file, Line: rd.Except.byDim()[d].line, Rule: r.name, Key: "except." + dimNames[d],
				Severity: SevWarning, Msg: fmt.Sprintf("excludes every %s that match.%s admits: the rule can never match", dimNames[d], dimNames[d])})
		}
	}
}

func (m *matchDoc) byDim() [nDims]*opt[[]string] {
	return [nDims]*opt[[]string]{&m.Partition, &m.Account, &m.QOS, &m.User, &m.Group}
}

// allCovered reports whether every pattern in ps is covered by one in by.
func allCovered(ps, by []glob) bool {
	for _, p := range ps {
		if !slices.ContainsFunc(by, func(g glob) bool { return g.covers(p) }) {
			return false
		}
	}
	return true
}

var (
	predictorName = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]*$`)
	dirEscape     = regexp.MustCompile(`%.?`)
)

// body converts and checks the settings of one rule or [defaults].
func (c *compiler) body(r *rule, path string, lines map[string]int) {
	b := r.body
	for _, l := range leaves(b, c.bodyLeaves) {
		if l.opt.set {
			l.opt.line = lines[path+"."+l.key]
			c.convErr(r.file, r.name, l.key, l.opt)
		}
	}
	bad := func(o *optBase, key, format string, args ...any) {
		c.add(&Problem{File: r.file, Line: o.line, Rule: r.name, Key: key, Msg: fmt.Sprintf(format, args...)})
	}
	ok := func(o *optBase) bool { return o.set && o.err == nil }

	for _, f := range []struct {
		key string
		o   *opt[[]string]
	}{{"images.allow", &b.Images.Allow}, {"images.deny", &b.Images.Deny}} {
		if !ok(&f.o.optBase) {
			continue
		}
		for _, s := range f.o.v {
			if err := validGlob(s); err != nil {
				bad(&f.o.optBase, f.key, "%v", err)
			}
		}
	}
	if ok(&b.Images.Allow.optBase) && len(b.Images.Allow.v) == 0 {
		c.add(&Problem{File: r.file, Line: b.Images.Allow.line, Rule: r.name, Key: "images.allow", Severity: SevWarning,
			Msg: "empty: no image can run in jobs this rule matches"})
	}

	l := &b.Limits
	for _, f := range []struct {
		key string
		o   *opt[int64]
	}{{"limits.max_nodes", &l.MaxNodes}, {"limits.max_cpus_per_node", &l.MaxCPUsPerNode},
		{"limits.max_cpus_per_job", &l.MaxCPUsPerJob}, {"limits.default_cpus_per_node", &l.DefaultCPUsPerNode}} {
		if ok(&f.o.optBase) && f.o.v < 1 {
			bad(&f.o.optBase, f.key, "must be at least 1, got %d", f.o.v)
		}
	}
	for _, f := range []struct {
		key string
		o   *opt[Size]
	}{{"limits.max_mem_per_node", &l.MaxMemPerNode}, {"limits.max_mem_per_job", &l.MaxMemPerJob},
		{"limits.default_mem_per_node", &l.DefaultMemPerNode}} {
		if ok(&f.o.optBase) && f.o.v <= 0 {
			bad(&f.o.optBase, f.key, "must be more than 0")
		}
	}
	if ok(&l.DefaultCPUsPerNode.optBase) && ok(&l.MaxCPUsPerNode.optBase) && l.DefaultCPUsPerNode.v > l.MaxCPUsPerNode.v {
		bad(&l.DefaultCPUsPerNode.optBase, "limits.default_cpus_per_node", "%d is above limits.max_cpus_per_node = %d",
			l.DefaultCPUsPerNode.v, l.MaxCPUsPerNode.v)
	}
	if ok(&l.DefaultMemPerNode.optBase) && ok(&l.MaxMemPerNode.optBase) && l.DefaultMemPerNode.v > l.MaxMemPerNode.v {
		bad(&l.DefaultMemPerNode.optBase, "limits.default_mem_per_node", "%v is above limits.max_mem_per_node = %v",
			l.DefaultMemPerNode.v, l.MaxMemPerNode.v)
	}

	ck := &b.Checkpoint
	if ok(&ck.MinInterval.optBase) && ck.MinInterval.v <= 0 {
		bad(&ck.MinInterval.optBase, "checkpoint.min_interval", "must be more than 0")
	}
	if ok(&ck.MinInterval.optBase) && ok(&ck.Interval.optBase) && ck.Interval.v > 0 && Duration(ck.Interval.v) < ck.MinInterval.v {
		bad(&ck.Interval.optBase, "checkpoint.interval", "%v is below checkpoint.min_interval = %v: no interval satisfies both",
			Duration(ck.Interval.v), ck.MinInterval.v)
	}
	if ok(&ck.Dir.optBase) {
		d := ck.Dir.v
		switch {
		case !filepath.IsAbs(d):
			bad(&ck.Dir.optBase, "checkpoint.dir", "%q must be an absolute path", d)
		case slices.Contains(strings.Split(d, "/"), ".."):
			bad(&ck.Dir.optBase, "checkpoint.dir", "%q must not contain ..", d)
		default:
			for _, e := range dirEscape.FindAllString(d, -1) {
				if !slices.Contains([]string{"%u", "%a", "%p", "%j", "%%"}, e) {
					bad(&ck.Dir.optBase, "checkpoint.dir", "unknown escape %q (known: %%u user, %%a account, %%p partition, %%j job id, %%%% a percent sign)", e)
					break
				}
			}
		}
	}
	if ok(&ck.Keep.optBase) && ck.Keep.v < 1 {
		bad(&ck.Keep.optBase, "checkpoint.keep", "must be at least 1, got %d", ck.Keep.v)
	}
	if ok(&ck.MaxSize.optBase) && ck.MaxSize.v <= 0 {
		bad(&ck.MaxSize.optBase, "checkpoint.max_size", "must be more than 0")
	}

	mg := &b.Migration
	if ok(&mg.Predictors.optBase) {
		for _, pn := range mg.Predictors.v {
			if !predictorName.MatchString(pn) {
				bad(&mg.Predictors.optBase, "migration.predictors", "%q is not a predictor name (lower-case letters, digits, . _ -)", pn)
			}
		}
		if len(mg.Predictors.v) == 0 && ok(&mg.Enabled.optBase) && mg.Enabled.v {
			bad(&mg.Predictors.optBase, "migration.predictors", "empty while migration.enabled = true: nothing would trigger a migration")
		}
	}
	if ok(&mg.RiskThreshold.optBase) && !(mg.RiskThreshold.v > 0 && mg.RiskThreshold.v <= 1) {
		bad(&mg.RiskThreshold.optBase, "migration.risk_threshold", "must be a probability in (0, 1], got %v", mg.RiskThreshold.v)
	}
	if ok(&mg.SpareNodes.optBase) && mg.SpareNodes.v < 0 {
		bad(&mg.SpareNodes.optBase, "migration.spare_nodes", "must not be negative, got %d", mg.SpareNodes.v)
	}

	cg := &b.Cgroup
	for _, f := range []struct {
		key    string
		o      *opt[int64]
		lo, hi int64
	}{{"cgroup.cpu_weight", &cg.CPUWeight, 1, 10000}, {"cgroup.io_weight", &cg.IOWeight, 1, 10000},
		{"cgroup.cpu_quota_percent", &cg.CPUQuotaPercent, 1, 1 << 30}, {"cgroup.pids_max", &cg.PidsMax, 1, 1 << 30}} {
		if ok(&f.o.optBase) && (f.o.v < f.lo || f.o.v > f.hi) {
			bad(&f.o.optBase, f.key, "must be between %d and %d, got %d", f.lo, f.hi, f.o.v)
		}
	}
	for _, f := range []struct {
		key string
		o   *opt[Size]
	}{{"cgroup.memory_max", &cg.MemoryMax}, {"cgroup.memory_high", &cg.MemoryHigh}} {
		if ok(&f.o.optBase) && f.o.v <= 0 {
			bad(&f.o.optBase, f.key, "must be more than 0")
		}
	}
	if ok(&cg.MemoryHigh.optBase) && ok(&cg.MemoryMax.optBase) && cg.MemoryHigh.v > cg.MemoryMax.v {
		bad(&cg.MemoryHigh.optBase, "cgroup.memory_high", "%v is above cgroup.memory_max = %v", cg.MemoryHigh.v, cg.MemoryMax.v)
	}

	if ok(&b.Override.optBase) {
		r.override = map[string]int{}
		for _, f := range b.Override.v {
			switch {
			case slices.Contains(overridable, f):
				r.override[f] = b.Override.line
			case strings.HasPrefix(f, "limits.") || strings.HasPrefix(f, "images."):
				bad(&b.Override.optBase, "user_may_override", "%q cannot be overridden by users: raise the limit for the jobs concerned instead", f)
			default:
				bad(&b.Override.optBase, "user_may_override", "unknown setting %q (overridable: %s)", f, strings.Join(overridable, ", "))
			}
		}
	}
}

// crossChecks finds problems that involve more than one rule or file.
func (c *compiler) crossChecks() {
	// Matchers on partitions or QoS the site says do not exist.
	var parts, qos []string
	var partsSet, qosSet bool
	for _, s := range c.site {
		if s.partitions.set && s.partitions.err == nil {
			parts, partsSet = append(parts, s.partitions.v...), true
		}
		if s.qos.set && s.qos.err == nil {
			qos, qosSet = append(qos, s.qos.v...), true
		}
	}
	for _, r := range c.rules {
		for _, chk := range []struct {
			d     dim
			names []string
			set   bool
		}{{dimPartition, parts, partsSet}, {dimQOS, qos, qosSet}} {
			if !chk.set || !r.hasMatch[chk.d] || len(r.match[chk.d]) == 0 {
				continue
			}
			hit := false
			for _, g := range r.match[chk.d] {
				hit = hit || slices.ContainsFunc(chk.names, g.match)
			}
			if !hit {
				c.add(&Problem{File: r.file, Line: r.matchLine[chk.d], Rule: r.name, Key: "match." + dimNames[chk.d], Severity: SevWarning,
					Msg: fmt.Sprintf("matches no %s listed in site.%s (%s): the rule can never match",
						dimNames[chk.d], map[dim]string{dimPartition: "partitions", dimQOS: "qos"}[chk.d], strings.Join(chk.names, ", "))})
			}
		}
	}

	// Allow lists that deny lists (which add up) empty entirely. A deny in
	// the same rule or in a rule that applies to every job always applies.
	var globalDeny []*rule
	for _, r := range c.rules {
		if r.global() && r.body.Images.Deny.set && r.body.Images.Deny.err == nil {
			globalDeny = append(globalDeny, r)
		}
	}
	for _, r := range c.rules {
		allow := &r.body.Images.Allow
		if !allow.set || allow.err != nil || len(allow.v) == 0 {
			continue
		}
		denyBy := map[string]bool{}
		var deny []glob
		for _, dr := range append([]*rule{r}, globalDeny...) {
			if !dr.body.Images.Deny.set || dr.body.Images.Deny.err != nil {
				continue
			}
			for _, s := range dr.body.Images.Deny.v {
				if validGlob(s) == nil {
					deny = append(deny, glob(s))
					denyBy[fmt.Sprintf("%q (%s:%d)", dr.name, dr.file, dr.body.Images.Deny.line)] = true
				}
			}
		}
		var allowG []glob
		for _, s := range allow.v {
			if validGlob(s) == nil {
				allowG = append(allowG, glob(s))
			}
		}
		if len(deny) > 0 && len(allowG) > 0 && allCovered(allowG, deny) {
			who := slices.Sorted(maps.Keys(denyBy))
			c.add(&Problem{File: r.file, Line: allow.line, Rule: r.name, Key: "images.allow", Severity: SevWarning,
				Msg: "every allowed image is denied (images.deny of rule " + strings.Join(who, ", rule ") + "): no image can run in jobs this rule matches"})
		}
	}
}
