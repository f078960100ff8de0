package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/hpcvm/hpcvm/policies"
)

// defaultPolicyDir is read when no --policy or --policy-dir is given.
const defaultPolicyDir = "/etc/hpcvm/policy.d"

func init() {
	register("policy", "check site policy files, explain or admit a VM request", func(args []string) int {
		return runPolicy(args, os.Stdin, os.Stdout, os.Stderr)
	})
}

const policyUsage = `usage: hpcvm policy check [FILE|DIR...]
       hpcvm policy explain [--policy FILE] [--policy-dir DIR] REQUEST-FLAGS [--json]
       hpcvm policy admit [--policy FILE] [--policy-dir DIR] [REQUEST-FLAGS | --request FILE|-] [--json]

check    validate policy files; exit 0, or 1 with every problem as file:line
explain  show the effective VM settings for a request and which rule set each
admit    decide a request (flags, or JSON on stdin when no request flag is
         given); exit 0 (admitted), 1 (refused: the message is for the user)
         or 2 (bad usage or unusable policy)

Without --policy or --policy-dir, ` + defaultPolicyDir + ` is read.
See docs/policies.md for the file format and the JSON request schema.
`

func runPolicy(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, policyUsage)
		return 2
	}
	switch args[0] {
	case "check":
		return policyCheck(args[1:], stdout, stderr)
	case "explain":
		return policyDecide(args[1:], false, stdin, stdout, stderr)
	case "admit":
		return policyDecide(args[1:], true, stdin, stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, policyUsage)
		return 0
	}
	fmt.Fprintf(stderr, "hpcvm policy: unknown subcommand %q\n\n%s", args[0], policyUsage)
	return 2
}

// policyPaths collects --policy and --policy-dir in command-line order,
// which is precedence order.
type policyPaths []string

func (p *policyPaths) String() string     { return strings.Join(*p, ",") }
func (p *policyPaths) Set(s string) error { *p = append(*p, s); return nil }

func policyCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("hpcvm policy check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, "usage: hpcvm policy check [FILE|DIR...]\n") }
	if err := fs.Parse(args); err != nil {
		return 2
	}
	paths := fs.Args()
	if len(paths) == 0 {
		paths = []string{defaultPolicyDir}
	}
	files, err := policies.ReadFiles(paths...)
	if err != nil {
		fmt.Fprintf(stderr, "hpcvm policy check: %v\n", err)
		return 2
	}
	p, problems := policies.Compile(files...) // in file and line order
	var nerr, nwarn int
	for _, pr := range problems {
		fmt.Fprintln(stdout, pr.Error())
		if pr.Severity == policies.SevError {
			nerr++
		} else {
			nwarn++
		}
	}
	if len(problems) > 0 {
		fmt.Fprintf(stderr, "hpcvm policy check: %d error(s), %d warning(s) in %d file(s)\n", nerr, nwarn, len(files))
		return 1
	}
	fmt.Fprintf(stdout, "ok: %d file(s), %d rule(s)\n", len(files), p.NumRules())
	return 0
}

// requestFlags binds the request's fields to flags.
type requestFlags struct {
	jobID, user, account, partition, qos, image string
	groups                                      []string
	nodes, cpus, cpusPerNode                    int
	mem, walltime, interval, atWalltime, mig    string
}

func (r *requestFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&r.jobID, "job-id", "", "Slurm job id (expands %j in checkpoint.dir)")
	fs.StringVar(&r.user, "user", "", "user name")
	fs.Func("group", "group of the user (repeat, or comma-separated)", func(s string) error {
		for g := range strings.SplitSeq(s, ",") {
			if g = strings.TrimSpace(g); g != "" {
				r.groups = append(r.groups, g)
			}
		}
		return nil
	})
	fs.StringVar(&r.account, "account", "", "Slurm account")
	fs.StringVar(&r.partition, "partition", "", "Slurm partition")
	fs.StringVar(&r.qos, "qos", "", "Slurm QoS")
	fs.StringVar(&r.image, "image", "", "VM image (--vm-image)")
	fs.IntVar(&r.nodes, "nodes", 0, "node count (default 1)")
	fs.IntVar(&r.cpus, "cpus", 0, "vCPUs for the whole VM (--vm-cpus)")
	fs.IntVar(&r.cpusPerNode, "cpus-per-node", 0, "vCPUs per node (--vm-cpus-per-node)")
	fs.StringVar(&r.mem, "mem", "", "guest memory per node, e.g. 64GiB (--vm-mem)")
	fs.StringVar(&r.walltime, "walltime", "", "job time limit, e.g. 12h or 1d")
	fs.StringVar(&r.interval, "checkpoint-interval", "", "checkpoint at least this often, or off (--vm-checkpoint-interval)")
	fs.StringVar(&r.atWalltime, "checkpoint-at-walltime", "", "yes, no or a lead time such as 15m (--vm-checkpoint-at-walltime)")
	fs.StringVar(&r.mig, "migration", "", "yes or no (--vm-migration)")
}

var requestFlagNames = []string{"job-id", "user", "group", "account", "partition", "qos", "image", "nodes", "cpus",
	"cpus-per-node", "mem", "walltime", "checkpoint-interval", "checkpoint-at-walltime", "migration"}

// apply copies the flags that were given onto req.
func (r *requestFlags) apply(fs *flag.FlagSet, req *policies.Request) error {
	var errs []error
	fs.Visit(func(f *flag.Flag) {
		var err error
		switch f.Name {
		case "job-id":
			req.JobID = r.jobID
		case "user":
			req.User = r.user
		case "group":
			req.Groups = r.groups
		case "account":
			req.Account = r.account
		case "partition":
			req.Partition = r.partition
		case "qos":
			req.QOS = r.qos
		case "image":
			req.Image = r.image
		case "nodes":
			req.Nodes = r.nodes
		case "cpus":
			req.CPUs = r.cpus
		case "cpus-per-node":
			req.CPUsPerNode = r.cpusPerNode
		case "mem":
			req.MemPerNode, err = policies.ParseSize(r.mem)
		case "walltime":
			req.Walltime, err = policies.ParseDuration(r.walltime)
		case "checkpoint-interval":
			err = req.CheckpointInterval.UnmarshalText([]byte(r.interval))
		case "checkpoint-at-walltime":
			req.CheckpointAtWalltime, err = policies.ParseWalltimeCheckpoint(r.atWalltime)
		case "migration":
			req.Migration, err = policies.ParseWish(r.mig)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("--%s: %w", f.Name, err))
		}
	})
	return errors.Join(errs...)
}

// policyDecide runs explain (admit=false) or admit.
func policyDecide(args []string, admit bool, stdin io.Reader, stdout, stderr io.Writer) int {
	name := "hpcvm policy explain"
	if admit {
		name = "hpcvm policy admit"
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var paths policyPaths
	fs.Var(&paths, "policy", "policy file (repeatable; order is precedence, later wins)")
	fs.Var(&paths, "policy-dir", "policy directory: its *.toml files in lexical order (repeatable)")
	var rf requestFlags
	rf.register(fs)
	reqFile := fs.String("request", "", "read the request as JSON from this file (- for stdin); flags override its fields")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", name, fs.Arg(0))
		return 2
	}
	if len(paths) == 0 {
		paths = policyPaths{defaultPolicyDir}
	}

	var req policies.Request
	anyFlag := false
	fs.Visit(func(f *flag.Flag) { anyFlag = anyFlag || slices.Contains(requestFlagNames, f.Name) })
	src := *reqFile
	if src == "" && admit && !anyFlag {
		src = "-"
	}
	if src != "" {
		if err := readRequest(src, stdin, &req); err != nil {
			fmt.Fprintf(stderr, "hpcvm: invalid request: %v\n", err)
			return 2
		}
	}
	if err := rf.apply(fs, &req); err != nil {
		fmt.Fprintf(stderr, "hpcvm: invalid request: %v\n", err)
		return 2
	}

	p, err := policies.Load(paths...)
	if err != nil {
		if admit {
			// The user cannot fix this; say so before the details.
			fmt.Fprintf(stderr, "hpcvm: the site's VM policy cannot be loaded; please tell your administrators:\n%v\n", err)
		} else {
			fmt.Fprintf(stderr, "%s: %v\n", name, err)
		}
		return 2
	}
	x := p.Explain(req)
	refused := x.Err() != nil

	switch {
	case !admit && *asJSON:
		writeJSON(stdout, explanationJSON(x))
	case !admit:
		printExplanation(stdout, p, x)
	case refused:
		// Nothing on stdout: the caller must not mistake it for settings.
	case *asJSON:
		writeJSON(stdout, x.Effective)
	default:
		fmt.Fprintln(stdout, summary(x.Effective))
	}
	if admit {
		for _, e := range x.Refusals {
			fmt.Fprintln(stderr, e)
		}
		if !refused {
			for _, w := range x.Effective.Warnings {
				fmt.Fprintf(stderr, "hpcvm: warning: %s\n", w)
			}
		}
	}
	if refused {
		return 1
	}
	return 0
}

// readRequest decodes a JSON request, refusing unknown fields so that a
// misspelt "mem_per_nod" is not silently ignored.
func readRequest(src string, stdin io.Reader, req *policies.Request) error {
	r := stdin
	if src != "-" {
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		defer f.Close()
		r = f
	}
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(req); err != nil {
		return fmt.Errorf("JSON request from %s: %w", displayName(src), err)
	}
	if dec.More() {
		return fmt.Errorf("JSON request from %s: more than one object", displayName(src))
	}
	return nil
}

func displayName(src string) string {
	if src == "-" {
		return "standard input"
	}
	return src
}

func writeJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // only the writer can fail, and then nobody is listening
}

// summary is admit's one-line answer for people.
func summary(e *policies.Effective) string {
	s := fmt.Sprintf("hpcvm: admitted: image %s, %d node(s), %d vCPUs (%d per node), %v per node",
		e.Image, e.Nodes, e.VCPUs, e.VCPUsPerNode, e.MemPerNode)
	if e.Checkpoint.Interval > 0 {
		s += fmt.Sprintf(", checkpoint every %v", e.Checkpoint.Interval)
	}
	if e.Checkpoint.BeforeWalltime > 0 {
		s += fmt.Sprintf(", checkpoint %v before walltime", e.Checkpoint.BeforeWalltime)
	}
	if e.Migration.Enabled {
		s += ", migration on"
	}
	return s
}

func printExplanation(w io.Writer, p *policies.Policy, x *policies.Explanation) {
	fmt.Fprintf(w, "policy files (later wins): %s\n\n", strings.Join(p.Files(), ", "))
	fmt.Fprintln(w, "matching rules, highest precedence first:")
	if len(x.Matched) == 0 {
		fmt.Fprintln(w, "  none")
	}
	for _, o := range x.Matched {
		fmt.Fprintf(w, "  %v\n", o)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SETTING\tVALUE\tSET BY")
	e := x.Effective
	for _, s := range policies.Settings() {
		o, ok := e.Provenance[s]
		if !ok {
			continue // not reached: the request was refused earlier
		}
		by := o.String()
		if s == "image" {
			by = "your request, allowed by " + by
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", s, e.Value(s), by)
	}
	_ = tw.Flush()
	if len(x.Limits) > 0 {
		fmt.Fprintln(w, "\nlimits checked:")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, l := range x.Limits {
			fmt.Fprintf(tw, "  %s = %s\t%v\n", l.Setting, l.Value, l.Origin)
		}
		_ = tw.Flush()
	}
	for _, warn := range e.Warnings {
		fmt.Fprintf(w, "\nwarning: %s\n", warn)
	}
	fmt.Fprintln(w)
	if err := x.Err(); err != nil {
		fmt.Fprintf(w, "result: REFUSED\n%v\n", err)
		return
	}
	fmt.Fprintln(w, "result: admitted")
}

// explanationJSON is explain --json: the effective settings (as admit
// --json prints them) plus the decision and its reasons.
func explanationJSON(x *policies.Explanation) any {
	refusals := make([]string, len(x.Refusals))
	for i, e := range x.Refusals {
		refusals[i] = e.Error()
	}
	limits := make([]map[string]any, len(x.Limits))
	for i, l := range x.Limits {
		limits[i] = map[string]any{"setting": l.Setting, "value": l.Value, "origin": l.Origin}
	}
	return map[string]any{
		"admitted":  len(x.Refusals) == 0,
		"refusals":  refusals,
		"matched":   append([]policies.Origin{}, x.Matched...),
		"limits":    limits,
		"effective": x.Effective,
	}
}
