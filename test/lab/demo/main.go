// Command demo is hpcvm's main job (`make demo-slurm`): it brings up a
// real Slurm 22.05 cluster of two virt nodes with the hpcvm plugin (see
// test/lab), submits
//
//	sbatch -N 2 --vm-image=debian12 examples/hello.sbatch
//
// prints the job's output (the guest's /etc/os-release, kernel, CPU count
// and memory) and Slurm's record of the job, and tears everything down.
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

	"github.com/hpcvm/hpcvm/test/lab"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

func main() {
	nodes := flag.Int("nodes", 2, "virt nodes (and sbatch -N)")
	image := flag.String("image", "debian12", "--vm-image")
	store := flag.String("image-store", envOr("HPCVM_IMAGE_STORE", "/var/lib/hpcvm/images"), "image store")
	script := flag.String("script", filepath.Join(lab.RepoRoot(), "examples", "hello.sbatch"), "job script")
	timeout := flag.Duration("timeout", 30*time.Minute, "give up after this long")
	flag.Parse()

	if err := lab.VirtPrerequisites(); err != nil {
		fatal(fmt.Errorf("%v (make demo-slurm installs and builds what is needed)", err))
	}
	for _, f := range []string{lab.HpcvmBin(), lab.SpankSO(), filepath.Join(*store, *image, "manifest.json")} {
		if _, err := os.Stat(f); err != nil {
			fatal(fmt.Errorf("%v (make build spank image-debian12)", err))
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	if err := os.MkdirAll(virtnode.CacheDir(), 0o755); err != nil {
		fatal(err)
	}
	dir, err := os.MkdirTemp(virtnode.CacheDir(), "demo-lab-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(dir)
	policy := filepath.Join(dir, "policy")
	if err := lab.WritePolicy(policy); err != nil {
		fatal(err)
	}
	say := func(f string, a ...any) { fmt.Printf("demo: "+f+"\n", a...) }
	start := time.Now()
	say("bringing up a Slurm 22.05 cluster of %d virt nodes (QEMU TCG with KVM inside; slurmd + the hpcvm plugin in each)...", *nodes)
	c, err := lab.StartVirt(ctx, lab.VirtOptions{Nodes: *nodes, Dir: dir, Hpcvm: lab.HpcvmBin(), SpankSO: lab.SpankSO(),
		PolicyDir: policy, ImageStore: *store, Logf: say})
	if err != nil {
		fatal(err)
	}
	defer func() {
		say("tearing the cluster down")
		c.Close()
	}()
	say("cluster up after %v", time.Since(start).Round(time.Second))
	show(ctx, c, "sinfo -N")

	work := filepath.Join(dir, "work")
	os.MkdirAll(work, 0o777)
	// Relative paths: sbatch runs in the lab directory, which the nodes share.
	out, errf := filepath.Join(work, "hello.out"), filepath.Join(work, "hello.err")
	cmd := fmt.Sprintf("sbatch -N %d --vm-image=%s -o work/hello.out -e work/hello.err %s", *nodes, *image, *script)
	fmt.Printf("\n$ %s\n", strings.Replace(cmd, *script, "examples/hello.sbatch", 1))
	submitted := time.Now()
	id, r, err := lab.Submit(ctx, c, cmd)
	fmt.Print(r.Stdout, r.Stderr)
	if err != nil {
		fatal(err)
	}
	say("job %s submitted; the VM boots on %d nodes (under TCG this takes minutes)...", id, *nodes)
	last := ""
	var j lab.Job
	for {
		j, err = lab.ShowJob(ctx, c, id)
		if err == nil && j.State != last {
			say("job %s: %s (%v)", id, j.State, time.Since(submitted).Round(time.Second))
			last = j.State
		}
		if err == nil && lab.Finished(j.State) {
			break
		}
		select {
		case <-ctx.Done():
			fatal(fmt.Errorf("job %s did not finish: %w", id, ctx.Err()))
		case <-time.After(time.Second):
		}
	}
	fmt.Printf("\n---- job output (%s) ----\n", filepath.Base(out))
	b, _ := os.ReadFile(out)
	fmt.Print(string(b))
	if e, _ := os.ReadFile(errf); len(e) > 0 {
		fmt.Printf("---- job stderr ----\n%s", e)
	}
	fmt.Println("---- scontrol show job ----")
	show(ctx, c, "scontrol show job "+id)
	fmt.Println("---- accounting record (jobcomp/filetxt: the lab has no slurmdbd, so sacct has no data) ----")
	if b, err := os.ReadFile(c.JobCompLog()); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "JobId="+id+" ") {
				fmt.Println(l)
			}
		}
	}
	fmt.Println()
	say("job %s: %s, ExitCode %s, %v from sbatch to the end", id, j.State, j.ExitCode, time.Since(submitted).Round(time.Second))
	if j.State != "COMPLETED" {
		stop()
		c.Close()
		os.Exit(1)
	}
}

func show(ctx context.Context, c *lab.VirtCluster, cmd string) {
	r, err := c.Client(ctx, cmd)
	if err != nil {
		fmt.Printf("%s: %v\n", cmd, err)
		return
	}
	fmt.Print(r.Stdout, r.Stderr)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "demo: %v\n", err)
	os.Exit(1)
}
