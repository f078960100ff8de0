// Command fakevmm stands in for `hpcvm vm run --stop-signal=SIGUSR1` in the
// host-namespace Slurm lab (test/lab), where nodes are namespaces on this
// machine and cannot boot a real guest. It accepts the same flags (those of
// `hpcvm vm run`; --stop-signal must be SIGUSR1) and signals (SIGTERM
// ignored, SIGUSR1 stops), creates a disk's overlay=FILE like the real VMM
// (the launcher removes it), "boots" by serving the real
// guest agent (guest/agent/server) on the hybrid vsock socket, so the
// launcher's whole path (plugin, srun slices, cgroups, agent protocol,
// signals, cleanup) runs for real while the job's commands run on the node.
//
// Kernel command line keys it understands: fakevmm.boot_delay=SECONDS
// (wait before serving the agent, to test cancellation during boot).
// On its console it writes one line of facts:
//
//	fakevmm: cpus=N mem=SIZE disk=PATH cgroup=PATH memory_limit=BYTES
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/server"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

func main() {

	fs := flag.NewFlagSet("fakevmm", flag.ExitOnError)
	fs.String("kernel", "", "")
	fs.String("initrd", "", "")
	var disks multi
	fs.Var(&disks, "disk", "")
	cpus := fs.Int("cpus", 1, "")
	mem := fs.String("mem", "", "")
	cmdline := fs.String("cmdline", "", "")
	vsock := fs.String("vsock", "", "")
	console := fs.String("console", "", "")
	stopSignal := fs.String("stop-signal", "", "")
	fs.Bool("v", false, "")
	fs.Parse(os.Args[1:])
	if *stopSignal != "SIGUSR1" {
		fmt.Fprintf(os.Stderr, "fakevmm: --stop-signal=%q, want SIGUSR1 (the slice stops its VMM with it)\n", *stopSignal)
		os.Exit(2)
	}
	for _, d := range disks {
		for _, o := range strings.Split(d, ",")[1:] {
			if f, ok := strings.CutPrefix(o, "overlay="); ok {
				// The real VMM creates the overlay (O_EXCL) and leaves it.
				o, err := os.OpenFile(f, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
				if err != nil {
					fmt.Fprintln(os.Stderr, "fakevmm: overlay:", err)
					os.Exit(1)
				}
				o.Close()
			}
		}
	}

	out := io.Writer(os.Stdout)
	if *console != "" {
		f, err := os.OpenFile(*console, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fakevmm:", err)
			os.Exit(1)
		}
		defer f.Close()
		out = f
	}
	cg := cgroupOf()
	fmt.Fprintf(out, "fakevmm: cpus=%d mem=%s disk=%s cgroup=%s memory_limit=%s\n", *cpus, *mem, strings.Join(disks, ","), cg, memoryLimit(cg))

	// Like `hpcvm vm run --stop-signal=SIGUSR1`: Slurm's SIGTERM is for the guest command,
	// the slice stops the VMM with SIGUSR1.
	// Caught and dropped rather than ignored: an ignored signal stays
	// ignored in every process started from here.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGUSR1)
	defer stop()
	for _, w := range strings.Fields(*cmdline) {
		if v, ok := strings.CutPrefix(w, "fakevmm.boot_delay="); ok {
			n, _ := strconv.Atoi(v)
			select {
			case <-time.After(time.Duration(n) * time.Second):
			case <-ctx.Done():
				fmt.Fprintln(out, "fakevmm: stopped while booting")
				os.Exit(143)
			}
		}
	}
	os.Remove(*vsock)
	l, err := net.Listen("unix", *vsock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakevmm:", err)
		os.Exit(1)
	}
	defer os.Remove(*vsock)
	defer os.RemoveAll("/tmp/hpcvm-job") // the launcher's guest directory, here on the node
	poweroff := make(chan struct{}, 1)
	srv := server.New(server.Config{
		Version: "fakevmm", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Power: powerFunc(func() { poweroff <- struct{}{} }), DrainTimeout: time.Second,
	})
	fmt.Fprintln(out, "fakevmm: agent serving")
	go srv.Serve(ctx, &hybridListener{Listener: l})
	select {
	case <-ctx.Done():
		fmt.Fprintln(out, "fakevmm: stopped")
		os.Exit(143)
	case <-poweroff:
		fmt.Fprintln(out, "fakevmm: poweroff")
	}
}

type powerFunc func()

func (f powerFunc) Poweroff(bool) error { f(); return nil }

// hybridListener answers the hybrid vsock handshake (CONNECT <port>\n ->
// OK <n>\n) before handing connections to the agent.
type hybridListener struct{ net.Listener }

func (h *hybridListener) Accept() (net.Conn, error) {
	for {
		c, err := h.Listener.Accept()
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := readLine(c)
		if err != nil || !strings.HasPrefix(line, "CONNECT ") {
			c.Close()
			continue
		}
		if _, err := io.WriteString(c, "OK 1073741824\n"); err != nil {
			c.Close()
			continue
		}
		c.SetDeadline(time.Time{})
		return c, nil
	}
}

func readLine(c net.Conn) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for len(b) < 64 {
		if _, err := c.Read(one); err != nil {
			return "", err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
	return "", errors.New("line too long")
}

// cgroupOf is this process's cgroup: the v2 path, or the v1 memory one.
func cgroupOf() string {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "?"
	}
	defer f.Close()
	v2 := ""
	s := bufio.NewScanner(f)
	for s.Scan() {
		parts := strings.SplitN(s.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "memory" {
				return "memory:" + parts[2]
			}
		}
		if parts[0] == "0" {
			v2 = parts[2]
		}
	}
	return "unified:" + v2
}

func memoryLimit(cg string) string {
	var p string
	if v, ok := strings.CutPrefix(cg, "memory:"); ok {
		p = "/sys/fs/cgroup/memory" + v + "/memory.limit_in_bytes"
	} else if v, ok := strings.CutPrefix(cg, "unified:"); ok {
		p = "/sys/fs/cgroup" + v + "/memory.max"
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
