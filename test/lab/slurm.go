package lab

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// Clienter runs Slurm client commands against a lab.
type Clienter interface {
	Client(ctx context.Context, script string) (Result, error)
}

// WaitIdle waits until sinfo reports n nodes idle.
func WaitIdle(ctx context.Context, c Clienter, n int) error {
	var last Result
	for {
		r, err := c.Client(ctx, "sinfo -h -N -o '%N %T'")
		if err == nil {
			last = r
			idle := 0
			for _, l := range strings.Split(r.Stdout, "\n") {
				if f := strings.Fields(l); len(f) == 2 && f[1] == "idle" {
					idle++
				}
			}
			if idle >= n {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: nodes not idle: %w (last sinfo: %s)", ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Job is what `scontrol show job` says about a job.
type Job struct {
	ID       string
	State    string // JobState, e.g. COMPLETED, FAILED, TIMEOUT, CANCELLED
	ExitCode string // e.g. "3:0"
	Reason   string
	Fields   map[string]string
}

var fieldRE = regexp.MustCompile(`(\S+?)=(\S*)`)

// ShowJob parses `scontrol show job -o ID`.
func ShowJob(ctx context.Context, c Clienter, id string) (Job, error) {
	r, err := c.Client(ctx, "scontrol show job -o "+id)
	if err != nil {
		return Job{}, err
	}
	if r.ExitCode != 0 {
		return Job{}, fmt.Errorf("scontrol show job %s: %s", id, r)
	}
	j := Job{ID: id, Fields: map[string]string{}}
	for _, m := range fieldRE.FindAllStringSubmatch(r.Stdout, -1) {
		if _, dup := j.Fields[m[1]]; !dup {
			j.Fields[m[1]] = m[2]
		}
	}
	j.State, j.ExitCode, j.Reason = j.Fields["JobState"], j.Fields["ExitCode"], j.Fields["Reason"]
	return j, nil
}

// Finished reports whether a job state is final.
func Finished(state string) bool {
	switch state {
	case "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT", "SIGNALING":
		return false
	}
	return state != ""
}

// WaitJob polls the job until its state is final (and not COMPLETING).
func WaitJob(ctx context.Context, c Clienter, id string) (Job, error) {
	for {
		j, err := ShowJob(ctx, c, id)
		if err == nil && Finished(j.State) {
			return j, nil
		}
		select {
		case <-ctx.Done():
			return j, fmt.Errorf("lab: job %s not finished: %w (last state %q, err %v)", id, ctx.Err(), j.State, err)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// WaitState polls until the job reaches one of states.
func WaitState(ctx context.Context, c Clienter, id string, states ...string) (Job, error) {
	for {
		j, err := ShowJob(ctx, c, id)
		if err == nil {
			for _, s := range states {
				if j.State == s {
					return j, nil
				}
			}
			if Finished(j.State) {
				return j, fmt.Errorf("lab: job %s ended %s before reaching %v", id, j.State, states)
			}
		}
		select {
		case <-ctx.Done():
			return j, fmt.Errorf("lab: job %s not in %v: %w (last %q)", id, states, ctx.Err(), j.State)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

var submittedRE = regexp.MustCompile(`Submitted batch job (\d+)`)

// Submit runs an sbatch command line and returns the job id.
func Submit(ctx context.Context, c Clienter, sbatch string) (string, Result, error) {
	r, err := c.Client(ctx, sbatch)
	if err != nil {
		return "", r, err
	}
	m := submittedRE.FindStringSubmatch(r.Stdout)
	if r.ExitCode != 0 || m == nil {
		return "", r, fmt.Errorf("%s: %s", sbatch, r)
	}
	return m[1], r, nil
}

// AcctJob is what `sacct -X` (the job allocation's record in slurmdbd)
// says about a job.
type AcctJob struct {
	ID, State, ExitCode string
}

// WaitAcct polls `sacct -X -j ID` until slurmdbd holds a final state for
// the job (slurmctld sends job records to slurmdbd asynchronously). A
// cancelled job's "CANCELLED by UID" becomes CANCELLED.
func WaitAcct(ctx context.Context, c Clienter, id string) (AcctJob, error) {
	var last Result
	for {
		r, err := c.Client(ctx, "sacct -n -P -X -j "+id+" -o JobID,State,ExitCode")
		if err == nil && r.ExitCode == 0 {
			last = r
			for _, l := range strings.Split(strings.TrimSpace(r.Stdout), "\n") {
				f := strings.Split(l, "|")
				if len(f) != 3 || f[0] != id {
					continue
				}
				state, _, _ := strings.Cut(f[1], " ")
				if Finished(state) {
					return AcctJob{ID: id, State: state, ExitCode: f[2]}, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return AcctJob{}, fmt.Errorf("lab: sacct has no final record of job %s: %w (last: %s, err %v)", id, ctx.Err(), last, err)
		case <-time.After(300 * time.Millisecond):
		}
	}
}
