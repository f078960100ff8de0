// Command agent is the command service of a virt node (see test/virtnode).
//
// The node's init execs it as PID 1 inside the chroot. As PID 1 it starts a
// copy of itself as the worker and only reaps children (orphans of commands
// and daemons end up here); when the worker exits it powers the node off.
//
// The worker serves commands through the control directory, a read-write 9p
// share of a host directory (the -ctl flag; same path on host and node):
//
//	ready            written by the worker once it serves commands
//	new/<id>         host: "command <id> is ready to start" (empty file)
//	run/<id>/cmd     host: the shell script to run (written before new/<id>)
//	run/<id>/stdout  worker: the command's standard output, written as it runs
//	run/<id>/stderr  worker: the command's standard error
//	run/<id>/kill    host: "kill the command's process group"
//	run/<id>/rc      worker: the exit status (decimal), written last, atomically
//	alive            worker: rewritten every HeartbeatEvery with the node's
//	                 uptime; its host mtime going stale means the node hung
//
// inotify does not see host-side changes on 9p, so the worker polls.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctl := flag.String("ctl", "", "control directory")
	worker := flag.Bool("worker", false, "serve commands (internal: PID 1 starts this)")
	flag.Parse()
	if *ctl == "" {
		fmt.Fprintln(os.Stderr, "vn-agent: -ctl is required")
		os.Exit(2)
	}
	if os.Getpid() == 1 && !*worker {
		os.Exit(initMain(*ctl))
	}
	if err := serve(*ctl); err != nil {
		fmt.Fprintln(os.Stderr, "vn-agent:", err)
		os.Exit(1)
	}
}

// initMain is PID 1: start the worker, reap every child, power off when the
// worker is gone.
func initMain(ctl string) int {
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	cmd := exec.Command(self, "-worker", "-ctl", ctl)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "vn-agent: cannot start worker:", err)
		poweroff()
	}
	wpid := cmd.Process.Pid
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid == wpid {
			fmt.Fprintf(os.Stderr, "vn-agent: worker exited (%v, %v); powering off\n", ws, err)
			poweroff()
		}
	}
}

func poweroff() {
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	os.Exit(1)
}

// heartbeatEvery is how often the worker rewrites ctl/alive; the host's
// virtnode.HungAfter must be many times longer.
const heartbeatEvery = 2 * time.Second

type running struct {
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

func serve(ctl string) error {
	newDir := filepath.Join(ctl, "new")
	runDir := filepath.Join(ctl, "run")
	for _, d := range []string{newDir, runDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	os.Setenv("HOME", "/root")
	if h, err := os.Hostname(); err == nil {
		os.Setenv("HPCVM_NODE", h)
	}
	if err := writeAtomic(filepath.Join(ctl, "ready"), readyInfo()); err != nil {
		return err
	}
	up, _ := os.ReadFile("/proc/uptime")
	fmt.Printf("vn-agent: ready (uptime %s)\n", strings.Fields(string(up) + " ?")[0])

	active := map[string]*running{}
	delay := 5 * time.Millisecond
	var beat time.Time
	for {
		if time.Since(beat) >= heartbeatEvery {
			up, _ := os.ReadFile("/proc/uptime")
			writeAtomic(filepath.Join(ctl, "alive"), string(up))
			beat = time.Now()
		}
		busy := false
		ents, err := os.ReadDir(newDir)
		if err != nil {
			return err
		}
		for _, e := range ents {
			id := e.Name()
			if strings.HasPrefix(id, ".") {
				continue
			}
			os.Remove(filepath.Join(newDir, id))
			busy = true
			if r := start(filepath.Join(runDir, id)); r != nil {
				active[id] = r
			}
		}
		for id, r := range active {
			select {
			case <-r.done:
				delete(active, id)
				busy = true
				continue
			default:
			}
			if _, err := os.Stat(filepath.Join(r.dir, "kill")); err == nil {
				syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
			}
		}
		if busy {
			delay = 5 * time.Millisecond
		} else if delay < 100*time.Millisecond {
			delay += delay / 2
		}
		time.Sleep(delay)
	}
}

func readyInfo() string {
	var u syscall.Utsname
	syscall.Uname(&u)
	rel := func(b [65]int8) string {
		s := make([]byte, 0, len(b))
		for _, c := range b {
			if c == 0 {
				break
			}
			s = append(s, byte(c))
		}
		return string(s)
	}
	_, kvmErr := os.Stat("/dev/kvm")
	return fmt.Sprintf("node=%s\nkernel=%s\ncpus=%d\nkvm=%v\n", rel(u.Nodename), rel(u.Release), runtime.NumCPU(), kvmErr == nil)
}

// start launches run/<id>/cmd in its own process group and reports its exit
// status into run/<id>/rc when it ends.
func start(dir string) *running {
	fail := func(err error) *running {
		os.WriteFile(filepath.Join(dir, "stderr"), []byte("vn-agent: "+err.Error()+"\n"), 0o644)
		writeAtomic(filepath.Join(dir, "rc"), "127\n")
		return nil
	}
	stdout, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		return fail(err)
	}
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		stdout.Close()
		return fail(err)
	}
	cmd := exec.Command("/bin/sh", filepath.Join(dir, "cmd"))
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		stdout.Close()
		stderr.Close()
		return fail(err)
	}
	r := &running{dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		err := cmd.Wait()
		stdout.Close()
		stderr.Close()
		rc := 0
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
			switch {
			case ws.Signaled():
				rc = 128 + int(ws.Signal())
			default:
				rc = ws.ExitStatus()
			}
		} else if err != nil {
			rc = 255
		}
		writeAtomic(filepath.Join(dir, "rc"), strconv.Itoa(rc)+"\n")
	}()
	return r
}

func writeAtomic(path, content string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
