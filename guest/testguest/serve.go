package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
)

// Greeting prefixes every answer of the greet port.
const Greeting = "hpcvm-testguest hello from"

// Server holds the handlers of the test ports. They work on any net.Conn, so
// they are tested over in-memory pipes.
type Server struct {
	// StopFile is created by the control command "stop"; /init polls it.
	StopFile string
	// Hostname overrides os.Hostname (tests).
	Hostname string
}

func (s *Server) hostname() string {
	if s.Hostname != "" {
		return s.Hostname
	}
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}

// Echo sends back everything it receives until EOF.
func (s *Server) Echo(c net.Conn) {
	io.Copy(c, c)
}

// Greet answers every line with the greeting and the hostname.
func (s *Server) Greet(c net.Conn) {
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		if _, err := fmt.Fprintf(c, "%s %s\n", Greeting, s.hostname()); err != nil {
			return
		}
	}
}

// Control serves line commands, one answer each:
//
//	ping          -> "pong"
//	facts         -> the facts line (nproc=, memtotal_kb=, cpus_online=)
//	run CMD       -> "OUT <n>\n", n bytes of combined stdout+stderr of sh -c CMD, "EXIT <status>\n"
//	stop          -> creates StopFile, "OK stopping"; /init then powers off
//	anything else -> "ERR unknown command"
func (s *Server) Control(c net.Conn) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		line = strings.TrimSpace(line)
		if line != "" {
			if werr := s.command(c, line); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (s *Server) command(w io.Writer, line string) error {
	cmd, arg, _ := strings.Cut(line, " ")
	var err error
	switch cmd {
	case "ping":
		_, err = fmt.Fprintln(w, "pong")
	case "facts":
		_, err = fmt.Fprintln(w, factsLine())
	case "run":
		out, status := run(arg)
		_, err = fmt.Fprintf(w, "OUT %d\n%sEXIT %d\n", len(out), out, status)
	case "stop":
		if ferr := os.WriteFile(s.StopFile, []byte("vsock\n"), 0o644); ferr != nil {
			_, err = fmt.Fprintf(w, "ERR %v\n", ferr)
		} else {
			_, err = fmt.Fprintln(w, "OK stopping")
		}
	default:
		_, err = fmt.Fprintln(w, "ERR unknown command")
	}
	return err
}

func run(command string) ([]byte, int) {
	var out bytes.Buffer
	cmd := exec.Command("/bin/sh", "-c", command)
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.Bytes(), 0
	case errors.As(err, &ee):
		if code := ee.ExitCode(); code >= 0 {
			return out.Bytes(), code
		}
		return out.Bytes(), 128 + 9 // killed by a signal
	default:
		fmt.Fprintf(&out, "%v\n", err)
		return out.Bytes(), 127
	}
}

// factsLine reports what the guest sees, in the same key=value form /init
// prints on the console.
func factsLine() string {
	mem := "unknown"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				mem = f[1]
			}
		}
	}
	online := "unknown"
	if b, err := os.ReadFile("/sys/devices/system/cpu/online"); err == nil {
		online = strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("nproc=%d memtotal_kb=%s cpus_online=%s", runtime.NumCPU(), mem, online)
}
