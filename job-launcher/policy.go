package launcher

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"

	"github.com/hpcvm/hpcvm/policies"
)

// Policy decides a request: the effective settings, or a *RefusedError.
type Policy interface {
	Admit(ctx context.Context, req policies.Request) (*policies.Effective, error)
}

// RefusedError is the site policy's refusal; Message is for the user.
type RefusedError struct{ Message string }

func (e *RefusedError) Error() string { return e.Message }

// ExecPolicy asks `hpcvm policy admit --json` with the request as JSON on
// standard input (docs/policies.md), so the launcher and the plugin get the
// same answer from the same program.
type ExecPolicy struct {
	Hpcvm string // hpcvm binary
	Dir   string // policy directory
}

// Admit implements Policy.
func (p ExecPolicy) Admit(ctx context.Context, req policies.Request) (*policies.Effective, error) {
	in, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("policy request: %w", err)
	}
	cmd := exec.CommandContext(ctx, p.Hpcvm, "policy", "admit", "--policy-dir", p.Dir, "--json")
	var out, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(in), &out, &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.ExitCode() == 1:
		return nil, &RefusedError{Message: strings.TrimSpace(stderr.String())}
	default:
		return nil, fmt.Errorf("hpcvm policy admit: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	var eff policies.Effective
	if err := json.Unmarshal(out.Bytes(), &eff); err != nil {
		return nil, fmt.Errorf("hpcvm policy admit --json: %w", err)
	}
	return &eff, nil
}
