// Command demo is hpcvm's main job, `make demo`: it brings up a real Slurm
// 22.05 cluster of two virt nodes with the hpcvm plugin (see test/lab),
// submits
//
//	sbatch -N 2 --vm-image=debian12 examples/hello.sbatch
//
// prints the job's output (the guest's /etc/os-release, kernel, CPU count
// and memory) and Slurm's record of the job (scontrol show job, sacct, the
// jobcomp log), and tears everything down. Everything it prints comes from
// the real job. (`make demo-vm` is the VM-only demo: test/demo.)
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
	"github.com/hpcvm/hpcvm/test/lab"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

type options struct {
	nodes   int
	image   string
	store   string
	script  string
	timeout time.Duration
}

func main() {
	var o options
	flag.IntVar(&o.nodes, "nodes", 2, "virt nodes (and sbatch -N)")
	flag.StringVar(&o.image, "image", "debian12", "--vm-image")
	flag.StringVar(&o.store, "image-store", envOr("HPCVM_IMAGE_STORE", "/var/lib/hpcvm/images"), "image store")
	flag.StringVar(&o.script, "script", filepath.Join(lab.RepoRoot(), "examples", "hello.sbatch"), "job script")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Minute, "give up after this long")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func say(f string, a ...any) { fmt.Printf("demo: "+f+"\n", a...) }

// run returns instead of exiting so that the cluster and the lab directory
// are always torn down.
func run(o options) (err error) {
	if err := lab.VirtPrerequisites(); err != nil {
		return fmt.Errorf("%v (make demo installs and builds what is needed)", err)
	}
	for _, f := range []string{lab.HpcvmBin(), lab.SpankSO(), filepath.Join(o.store, o.image, "manifest.json")} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("%v (make build spank image-%s)", err, o.image)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()

	if err := os.MkdirAll(virtnode.CacheDir(), 0o755); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(virtnode.CacheDir(), "demo-lab-")
	if err != nil {
		return err
	}
	defer func() {
		if err == nil {
			os.RemoveAll(dir)
			return
		}
		os.RemoveAll(filepath.Join(dir, "vn")) // the nodes' disks; keep the config, logs and job files
		say("kept %s for a look (Slurm logs in log/, job files in work/)", dir)
	}()
	policy := filepath.Join(dir, "policy")
	if err := lab.WritePolicy(policy); err != nil {
		return err
	}
	start := time.Now()
	say("bringing up a Slurm 22.05 cluster of %d virt nodes (QEMU TCG with KVM inside; slurmd + the hpcvm plugin in each)...", o.nodes)
	c, err := lab.StartVirt(ctx, lab.VirtOptions{Nodes: o.nodes, Dir: dir, Hpcvm: lab.HpcvmBin(), SpankSO: lab.SpankSO(),
		PolicyDir: policy, ImageStore: o.store, Logf: say})
	if err != nil {
		return err
	}
	defer func() {
		say("tearing the cluster down")
		c.Close()
		say("done after %v", time.Since(start).Round(time.Second))
	}()
	say("cluster up after %v", time.Since(start).Round(time.Second))
	show(ctx, c, "sinfo -N")

	work := filepath.Join(dir, "work")
	if err := os.MkdirAll(work, 0o777); err != nil {
		return err
	}
	// Relative paths: sbatch runs in the lab directory, which the nodes share.
	out, errf := filepath.Join(work, "hello.out"), filepath.Join(work, "hello.err")
	// The guest's console is kept (--vm-console: an absolute path) and
	// printed only if the job fails.
	console := filepath.Join(work, "console.log")
	cmd := fmt.Sprintf("sbatch -N %d --vm-image=%s -o work/hello.out -e work/hello.err --vm-console=%s %s", o.nodes, o.image, console, o.script)
	var id string
	var j lab.Job
	var elapsed time.Duration
	for attempt := 1; ; attempt++ {
		if id, j, elapsed, err = submitAndWait(ctx, c, cmd, o); err != nil {
			return err
		}
		// A guest that triple-faults while booting is a failure of the
		// virt-node platform (docs/testing.md: QEMU's own microvm resets
		// there too); the job is submitted once more, saying so.
		e, _ := os.ReadFile(errf)
		if attempt == 1 && j.State == "FAILED" && guestvm.TripleFaulted(string(e)) {
			fmt.Printf("\n---- job stderr (%s) ----\n%s", filepath.Base(errf), e)
			say("job %s: the guest triple-faulted while booting (a virt-node platform failure, docs/testing.md); submitting once more", id)
			continue
		}
		break
	}

	fmt.Printf("\n---- job output (%s) ----\n", filepath.Base(out))
	b, err := os.ReadFile(out)
	if err != nil {
		fmt.Printf("(%v)\n", err)
	}
	fmt.Print(string(b))
	if e, _ := os.ReadFile(errf); len(e) > 0 {
		fmt.Printf("---- job stderr (%s) ----\n%s", filepath.Base(errf), e)
	}
	fmt.Printf("\n---- scontrol show job %s ----\n", id)
	show(ctx, c, "scontrol show job "+id)
	// slurmdbd records the job asynchronously: wait for its final record.
	actx, acancel := context.WithTimeout(ctx, time.Minute)
	if _, err := lab.WaitAcct(actx, c, id); err != nil {
		fmt.Printf("(%v)\n", err)
	}
	acancel()
	sacct := "sacct -j " + id + " --format=JobID,JobName,Partition,NNodes,State,ExitCode,Elapsed"
	fmt.Printf("---- %s ----\n", sacct)
	show(ctx, c, sacct)
	fmt.Println()
	say("job %s: %s, ExitCode %s, %v from sbatch to the end", id, j.State, j.ExitCode, elapsed)
	if j.State != "COMPLETED" || j.ExitCode != "0:0" {
		fmt.Printf("---- guest console (%s), last lines ----\n%s\n", filepath.Base(console), lab.Tail(console, 40))
		return fmt.Errorf("job %s ended %s with ExitCode %s", id, j.State, j.ExitCode)
	}
	return nil
}

// show runs a Slurm client command in the lab and prints what it says,
// with its exit status when that is not 0.
func show(ctx context.Context, c *lab.VirtCluster, cmd string) {
	r, err := c.Client(ctx, cmd)
	if err != nil {
		fmt.Printf("%s: %v\n", cmd, err)
		return
	}
	fmt.Print(r.Stdout, r.Stderr)
	if r.ExitCode != 0 {
		fmt.Printf("(%s: exit status %d)\n", strings.Fields(cmd)[0], r.ExitCode)
	}
}

// submitAndWait submits the demo job and polls it until it ends, printing
// its state changes.
func submitAndWait(ctx context.Context, c *lab.VirtCluster, cmd string, o options) (string, lab.Job, time.Duration, error) {
	fmt.Printf("\n$ %s\n", strings.Replace(cmd, o.script, "examples/hello.sbatch", 1))
	submitted := time.Now()
	id, r, err := lab.Submit(ctx, c, cmd)
	fmt.Print(r.Stdout, r.Stderr)
	if err != nil {
		return "", lab.Job{}, 0, err
	}
	say("job %s submitted; the VM boots on %d nodes (under TCG this takes minutes)...", id, o.nodes)
	last := ""
	var j lab.Job
	for {
		j, err = lab.ShowJob(ctx, c, id)
		if err == nil && j.State != last {
			say("job %s: %s (%v)", id, j.State, time.Since(submitted).Round(time.Second))
			last = j.State
		}
		if err == nil && lab.Finished(j.State) {
			return id, j, time.Since(submitted).Round(time.Second), nil
		}
		select {
		case <-ctx.Done():
			return id, j, 0, fmt.Errorf("job %s did not finish: %w (last state %q)", id, ctx.Err(), j.State)
		case <-time.After(time.Second):
		}
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
