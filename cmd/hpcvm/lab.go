package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/test/lab"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

func init() {
	register("lab", "a local Slurm 22.05 cluster of virt nodes with the plugin (hpcvm lab up|status|exec|down)", labMain)
}

const labUsage = `usage: hpcvm lab up [--nodes N] [--cpus N] [--mem MiB] [--dir DIR] [--policy-dir DIR] [--image-store DIR]
       hpcvm lab status [--dir DIR]
       hpcvm lab exec [--dir DIR] -- COMMAND [ARGS...]
       hpcvm lab down [--dir DIR]

A real Slurm cluster on this machine for trying hpcvm: N virt nodes (QEMU
TCG machines with KVM inside, docs/testing.md) each running slurmd with the
hpcvm SPANK plugin, slurmctld and munged on the host side of their bridge.
'up' starts it in the background and returns when every node is idle;
'exec' runs a Slurm command (sbatch, srun, squeue, scontrol) in the lab's
network with SLURM_CONF set; 'down' stops everything. Needs root, make
build spank node-assets slurm-deps, and an image (make image-debian12).
See docs/slurm.md.
`

// labState is what 'up' leaves in DIR/lab.json for the other commands.
type labState struct {
	PID       int    `json:"pid"`   // the 'lab serve' process holding the lab
	NetNS     string `json:"netns"` // the lab network namespace
	SlurmConf string `json:"slurm_conf"`
	Nodes     int    `json:"nodes"`
}

func labMain(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, labUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	switch args[0] {
	case "up", "serve":
		return labUp(args[0], args[1:])
	case "status":
		return labStatus(args[1:])
	case "exec":
		return labExec(args[1:])
	case "down":
		return labDown(args[1:])
	}
	fmt.Fprintf(os.Stderr, "hpcvm lab: unknown command %q (known: up, status, exec, down)\n", args[0])
	return 2
}

func defaultLabDir() string { return filepath.Join(virtnode.CacheDir(), "lab") }

func labErr(format string, a ...any) int {
	fmt.Fprintf(os.Stderr, "hpcvm lab: "+format+"\n", a...)
	return 1
}

func readLabState(dir string) (*labState, error) {
	b, err := os.ReadFile(filepath.Join(dir, "lab.json"))
	if err != nil {
		return nil, fmt.Errorf("no lab in %s (hpcvm lab up): %w", dir, err)
	}
	var s labState
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "lab.json"), err)
	}
	if syscall.Kill(s.PID, 0) != nil {
		return nil, fmt.Errorf("the lab in %s is not running (its process %d is gone); run hpcvm lab down, then up", dir, s.PID)
	}
	return &s, nil
}

func labUp(mode string, args []string) int {
	fs := flag.NewFlagSet("hpcvm lab "+mode, flag.ContinueOnError)
	nodes := fs.Int("nodes", 2, "number of virt nodes")
	cpus := fs.Int("cpus", 2, "vCPUs per node")
	mem := fs.Int("mem", 2560, "memory per node in MiB")
	dir := fs.String("dir", defaultLabDir(), "lab `DIR` (config, logs, job files; shared with the nodes)")
	policyDir := fs.String("policy-dir", "", "site policy `DIR` (default: the lab policy, written into DIR/policy)")
	store := fs.String("image-store", labEnvOr("HPCVM_IMAGE_STORE", "/var/lib/hpcvm/images"), "image store `DIR`")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up if the lab is not up within this")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return labErr("%v", err)
	}
	*dir = abs
	self, err := os.Executable()
	if err != nil {
		return labErr("%v", err)
	}
	if mode == "up" {
		if s, err := readLabState(*dir); err == nil {
			return labErr("a lab is already running in %s (process %d); hpcvm lab down first", *dir, s.PID)
		}
		return labSpawn(self, *dir, *timeout, args)
	}

	// serve: bring the lab up, publish its state, hold it until SIGTERM.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()
	if *policyDir == "" {
		*policyDir = filepath.Join(*dir, "policy")
		if err := lab.WritePolicy(*policyDir); err != nil {
			return labErr("%v", err)
		}
	}
	bin := filepath.Dir(self)
	upCtx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c, err := lab.StartVirt(upCtx, lab.VirtOptions{Nodes: *nodes, CPUs: *cpus, MemMiB: *mem, Dir: *dir,
		Hpcvm: self, SpankSO: filepath.Join(bin, "hpcvm_spank.so"), PolicyDir: *policyDir, ImageStore: *store,
		Logf: func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }})
	if err != nil {
		return labErr("%v", err)
	}
	defer c.Close()
	st := labState{PID: os.Getpid(), NetNS: c.VN.NetNSPath(), SlurmConf: c.SlurmConf(), Nodes: *nodes}
	b, _ := json.MarshalIndent(st, "", "  ")
	if err := os.WriteFile(filepath.Join(*dir, "lab.json"), b, 0o644); err != nil {
		return labErr("%v", err)
	}
	fmt.Fprintln(os.Stderr, "lab: up")
	<-ctx.Done()
	os.Remove(filepath.Join(*dir, "lab.json"))
	fmt.Fprintln(os.Stderr, "lab: down")
	return 0
}

// labSpawn starts 'hpcvm lab serve' detached and waits until it is up.
func labSpawn(self, dir string, timeout time.Duration, args []string) int {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return labErr("%v", err)
	}
	os.Remove(filepath.Join(dir, "lab.json"))
	logPath := filepath.Join(dir, "lab.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return labErr("%v", err)
	}
	defer logf.Close()
	cmd := exec.Command(self, append([]string{"lab", "serve", "--dir", dir}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return labErr("starting the lab: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fmt.Fprintf(os.Stderr, "hpcvm lab: starting in %s (log: %s)\n", dir, logPath)
	deadline := time.After(timeout + 30*time.Second)
	for {
		if s, err := readLabState(dir); err == nil {
			fmt.Printf("lab up: %d node(s), SLURM_CONF=%s\nrun jobs with: %s lab exec -- sbatch -N %d --vm-image=debian12 examples/hello.sbatch\n",
				s.Nodes, s.SlurmConf, self, s.Nodes)
			return 0
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			return labErr("the lab did not come up (%v):\n%s", err, b)
		case <-deadline:
			cmd.Process.Signal(syscall.SIGTERM)
			return labErr("the lab did not come up within %v (log: %s)", timeout, logPath)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func labDirFlag(name string, args []string) (string, []string, int) {
	fs := flag.NewFlagSet("hpcvm lab "+name, flag.ContinueOnError)
	dir := fs.String("dir", defaultLabDir(), "lab `DIR`")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", nil, 0
		}
		return "", nil, 2
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return "", nil, labErr("%v", err)
	}
	return abs, fs.Args(), -1
}

// labCommand is cmd run in the lab's network with SLURM_CONF set.
func labCommand(s *labState, dir string, argv []string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=" + s.NetNS, "--"}, argv...)...)
	cmd.Env = append(os.Environ(), "SLURM_CONF="+s.SlurmConf)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	return cmd
}

func exitStatus(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return labErr("%v", err)
	}
	return 0
}

func labStatus(args []string) int {
	dir, _, rc := labDirFlag("status", args)
	if rc >= 0 {
		return rc
	}
	s, err := readLabState(dir)
	if err != nil {
		return labErr("%v", err)
	}
	fmt.Printf("lab in %s: process %d, %d node(s), SLURM_CONF=%s\n", dir, s.PID, s.Nodes, s.SlurmConf)
	if rc := exitStatus(labCommand(s, dir, []string{"sinfo", "-N", "-l"}).Run()); rc != 0 {
		return rc
	}
	return exitStatus(labCommand(s, dir, []string{"squeue"}).Run())
}

func labExec(args []string) int {
	dir, rest, rc := labDirFlag("exec", args)
	if rc >= 0 {
		return rc
	}
	if len(rest) == 0 {
		return labErr("exec: no command (hpcvm lab exec -- sbatch ...)")
	}
	s, err := readLabState(dir)
	if err != nil {
		return labErr("%v", err)
	}
	return exitStatus(labCommand(s, dir, rest).Run())
}

func labDown(args []string) int {
	dir, _, rc := labDirFlag("down", args)
	if rc >= 0 {
		return rc
	}
	b, err := os.ReadFile(filepath.Join(dir, "lab.json"))
	if err != nil {
		fmt.Printf("no lab running in %s\n", dir)
		return 0
	}
	var s labState
	if err := json.Unmarshal(b, &s); err != nil {
		return labErr("%v", err)
	}
	if err := syscall.Kill(s.PID, syscall.SIGTERM); err != nil {
		os.Remove(filepath.Join(dir, "lab.json"))
		fmt.Printf("lab process %d already gone\n", s.PID)
		return 0
	}
	for i := 0; i < 300 && syscall.Kill(s.PID, 0) == nil; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if syscall.Kill(s.PID, 0) == nil {
		syscall.Kill(s.PID, syscall.SIGKILL)
	}
	os.Remove(filepath.Join(dir, "lab.json"))
	fmt.Println("lab down (pid " + strconv.Itoa(s.PID) + ")")
	return 0
}

func labEnvOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
