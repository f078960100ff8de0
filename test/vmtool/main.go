// Command vmtool is a helper the e2e tests and the boot benchmark run inside
// a virt node (the harness builds it on the host; the node sees it through
// its 9p host root).
//
//	vmtool run [-marker S] [-guest-mem-mib N] -- CMD ARGS...
//	    Runs a VMM command, passes its stdout/stderr through, and when it
//	    exits prints one line "VMTOOL-RESULT {json}" on stderr (see Result):
//	    time to the first output line containing the marker, time to exit,
//	    exit status, and the VMM's memory (peak RSS from rusage, and the
//	    peak resident memory outside the guest-RAM mapping sampled from
//	    /proc/PID/smaps).
//	vmtool vsock -sock SOCKET -port P -msg M [-lines N] [-timeout D]
//	    Host side of a hybrid vsock (Firecracker protocol): connects to
//	    SOCKET, writes "CONNECT P\n", expects "OK <n>\n", sends M and prints
//	    what comes back (len(M) bytes, or N lines). Retries until the
//	    socket exists and the guest listens.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: vmtool run|vsock ...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "run":
		os.Exit(runMain(os.Args[2:]))
	case "vsock":
		os.Exit(vsockMain(os.Args[2:]))
	default:
		fmt.Fprintf(os.Stderr, "vmtool: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

// Result is what `vmtool run` reports.
type Result struct {
	MarkerMs   float64 `json:"marker_ms"`    // start to first line with the marker; -1 if never
	ExitMs     float64 `json:"exit_ms"`      // start to process exit
	ExitCode   int     `json:"exit_code"`    // 128+signal if killed
	MaxRSSKiB  int64   `json:"maxrss_kib"`   // peak RSS (getrusage of the child)
	PeakRSSKiB int64   `json:"peak_rss_kib"` // peak sampled VmRSS
	// PeakOwnKiB is the peak sampled resident memory outside mappings at
	// least as large as the guest RAM (i.e. the VMM's own memory: code,
	// heap, stacks, device buffers), from /proc/PID/smaps.
	PeakOwnKiB int64 `json:"peak_own_kib"`
	Samples    int   `json:"samples"`
	// KilledAfterHalt: the guest kernel halted (or powered down) but the
	// VMM did not exit within -halt-grace, so vmtool killed it.
	KilledAfterHalt bool `json:"killed_after_halt,omitempty"`
}

func runMain(args []string) int {
	fs := flag.NewFlagSet("vmtool run", flag.ExitOnError)
	marker := fs.String("marker", "", "output text that marks guest userspace")
	guestMiB := fs.Int64("guest-mem-mib", 0, "guest RAM size: mappings at least this large are guest RAM")
	every := fs.Duration("sample", 100*time.Millisecond, "memory sampling interval")
	haltGrace := fs.Duration("halt-grace", 60*time.Second,
		"kill the VMM if it is still running this long after the guest kernel printed that it halted or powered down")
	fs.Parse(args)
	if fs.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "vmtool run: no command")
		return 2
	}
	cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtool:", err)
		return 2
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtool:", err)
		return 2
	}
	res := Result{MarkerMs: -1}
	var haltOnce sync.Once
	var mu sync.Mutex
	start := time.Now()
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "vmtool:", err)
		return 127
	}
	pid := cmd.Process.Pid
	sample := func() {
		rss, own, ok := memSample(pid, *guestMiB<<10)
		if !ok {
			return
		}
		mu.Lock()
		res.Samples++
		res.PeakRSSKiB = max(res.PeakRSSKiB, rss)
		res.PeakOwnKiB = max(res.PeakOwnKiB, own)
		mu.Unlock()
	}
	scan := func(r io.Reader, w io.Writer, wg *sync.WaitGroup) {
		defer wg.Done()
		br := bufio.NewReader(r)
		for {
			line, err := br.ReadString('\n')
			if len(line) > 0 {
				w.Write([]byte(line))
				if strings.Contains(line, "reboot: System halted") || strings.Contains(line, "reboot: Power down") {
					haltOnce.Do(func() {
						time.AfterFunc(*haltGrace, func() {
							mu.Lock()
							res.KilledAfterHalt = true
							mu.Unlock()
							syscall.Kill(pid, syscall.SIGKILL)
						})
					})
				}
				if *marker != "" && strings.Contains(line, *marker) {
					mu.Lock()
					first := res.MarkerMs < 0
					if first {
						res.MarkerMs = msSince(start)
					}
					mu.Unlock()
					if first {
						sample()
					}
				}
			}
			if err != nil {
				return
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go scan(stdout, os.Stdout, &wg)
	go scan(stderr, os.Stderr, &wg)
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(*every)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				sample()
			}
		}
	}()
	wg.Wait()
	// Sample once more while the process may still exist (zombie-free).
	sample()
	err = cmd.Wait()
	res.ExitMs = msSince(start)
	close(stop)
	res.ExitCode = 0
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
		if ws.Signaled() {
			res.ExitCode = 128 + int(ws.Signal())
		} else {
			res.ExitCode = ws.ExitStatus()
		}
	} else if err != nil {
		res.ExitCode = 255
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		res.MaxRSSKiB = ru.Maxrss
	}
	mu.Lock()
	b, _ := json.Marshal(res)
	mu.Unlock()
	fmt.Fprintf(os.Stderr, "VMTOOL-RESULT %s\n", b)
	return res.ExitCode
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// memSample returns the process's total resident KiB and the resident KiB
// outside mappings of at least guestKiB (0: no mapping is guest RAM).
func memSample(pid int, guestKiB int64) (rss, own int64, ok bool) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var size int64
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		switch fields[0] {
		case "Size:":
			size, _ = strconv.ParseInt(fields[1], 10, 64)
		case "Rss:":
			v, _ := strconv.ParseInt(fields[1], 10, 64)
			rss += v
			if guestKiB == 0 || size < guestKiB {
				own += v
			}
		}
	}
	return rss, own, rss > 0
}

func vsockMain(args []string) int {
	fs := flag.NewFlagSet("vmtool vsock", flag.ExitOnError)
	sock := fs.String("sock", "", "hybrid vsock Unix socket")
	port := fs.Uint("port", 0, "guest vsock port")
	msg := fs.String("msg", "", "bytes to send")
	lines := fs.Int("lines", 0, "read this many answer lines instead of len(msg) bytes")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after")
	fs.Parse(args)
	deadline := time.Now().Add(*timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		got, err := vsockExchange(*sock, uint32(*port), *msg, *lines)
		if err == nil {
			fmt.Print(got)
			return 0
		}
		lastErr = err
		time.Sleep(200 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "vmtool vsock: %v\n", lastErr)
	return 1
}

func vsockExchange(sock string, port uint32, msg string, lines int) (string, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return "", err
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("no answer to CONNECT: %w", err)
	}
	if !strings.HasPrefix(line, "OK ") {
		return "", fmt.Errorf("CONNECT answered %q", line)
	}
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	if lines > 0 {
		var got strings.Builder
		for i := 0; i < lines; i++ {
			l, err := br.ReadString('\n')
			got.WriteString(l)
			if err != nil {
				return got.String(), fmt.Errorf("reading answer line %d: %w", i+1, err)
			}
		}
		return got.String(), nil
	}
	buf := make([]byte, len(msg))
	n, err := io.ReadFull(br, buf)
	if err != nil {
		return string(buf[:n]), fmt.Errorf("reading the answer (%d of %d bytes): %w", n, len(buf), err)
	}
	return string(buf), nil
}
