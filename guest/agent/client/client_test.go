package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
	"github.com/hpcvm/hpcvm/guest/agent/server"
)

type fakeClock struct {
	mu  sync.Mutex
	set []time.Time
}

func (f *fakeClock) SetClock(t time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set = append(f.set, t)
	return nil
}

type fakeFreezer struct {
	mu     sync.Mutex
	log    []string
	frozen map[string]bool
	thawed chan string
	fail   string // Freeze of this path fails
}

func (f *fakeFreezer) Freeze(p string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if p == f.fail {
		return syscall.EOPNOTSUPP
	}
	f.log = append(f.log, "freeze "+p)
	f.frozen[p] = true
	return nil
}

func (f *fakeFreezer) Thaw(p string) error {
	f.mu.Lock()
	f.log = append(f.log, "thaw "+p)
	delete(f.frozen, p)
	f.mu.Unlock()
	select {
	case f.thawed <- p:
	default:
	}
	return nil
}

func (f *fakeFreezer) snapshot() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.log...)
}

type fakePower struct{ calls chan bool }

func (f *fakePower) Poweroff(reboot bool) error { f.calls <- reboot; return nil }

type env struct {
	cl     *Client
	clock  *fakeClock
	freeze *fakeFreezer
	power  *fakePower
	sock   string
}

// newEnv runs an agent server in-process on a Unix socket.
func newEnv(t *testing.T) *env {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{
		clock:  &fakeClock{},
		freeze: &fakeFreezer{frozen: map[string]bool{}, thawed: make(chan string, 16)},
		power:  &fakePower{calls: make(chan bool, 1)},
		sock:   sock,
	}
	srv := server.New(server.Config{
		Version: "test",
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
		Clock:   e.clock, Freezer: e.freeze, Power: e.power,
		DrainTimeout: time.Second,
	})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; !errors.Is(err, context.Canceled) {
			t.Errorf("Serve: %v", err)
		}
	})
	e.cl = New(Unix(sock))
	return e
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func TestPing(t *testing.T) {
	e := newEnv(t)
	info, err := e.cl.Ping(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Agent != "test" || info.Protocol != proto.Version || info.Time.IsZero() {
		t.Fatalf("ping: %+v", info)
	}
}

func TestRun(t *testing.T) {
	e := newEnv(t)
	tmp := t.TempDir()
	tests := []struct {
		name       string
		cmd        Command
		wantStatus ExitStatus
		wantOut    string
		wantErr    string
	}{
		{"exit 0", Command{Argv: []string{"true"}}, ExitStatus{}, "", ""},
		{"exit 3", Command{Argv: []string{"sh", "-c", "exit 3"}}, ExitStatus{Code: 3}, "", ""},
		{"killed by signal", Command{Argv: []string{"sh", "-c", "kill -KILL $$"}}, ExitStatus{Signal: syscall.SIGKILL}, "", ""},
		{"stdout and stderr apart", Command{Argv: []string{"sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"}}, ExitStatus{}, "out1\nout2\n", "err1\nerr2\n"},
		{"env", Command{Argv: []string{"sh", "-c", `printf %s "$GREETING"`}, Env: []string{"PATH=/usr/bin:/bin", "GREETING=hello world"}}, ExitStatus{}, "hello world", ""},
		{"default env is PATH only", Command{Argv: []string{"env"}}, ExitStatus{}, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n", ""},
		{"cwd", Command{Argv: []string{"pwd"}, Dir: tmp}, ExitStatus{}, tmp + "\n", ""},
		{"default cwd", Command{Argv: []string{"pwd"}}, ExitStatus{}, "/\n", ""},
		{"stdin", Command{Argv: []string{"tr", "a-z", "A-Z"}, Stdin: strings.NewReader("shout")}, ExitStatus{}, "SHOUT", ""},
		{"no stdin is /dev/null", Command{Argv: []string{"cat"}}, ExitStatus{}, "", ""},
		{"absolute argv0", Command{Argv: []string{"/bin/sh", "-c", "echo $0"}}, ExitStatus{}, "/bin/sh\n", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			st, err := e.cl.Run(ctx(t), tc.cmd, &out, &errb)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if st != tc.wantStatus {
				t.Errorf("status %v, want %v", st, tc.wantStatus)
			}
			if out.String() != tc.wantOut || errb.String() != tc.wantErr {
				t.Errorf("stdout %q stderr %q, want %q %q", out.String(), errb.String(), tc.wantOut, tc.wantErr)
			}
		})
	}
}

func TestExitCodeConvention(t *testing.T) {
	tests := []struct {
		st   ExitStatus
		want int
	}{{ExitStatus{}, 0}, {ExitStatus{Code: 3}, 3}, {ExitStatus{Signal: syscall.SIGTERM}, 143}}
	for _, tc := range tests {
		if got := tc.st.ExitCode(); got != tc.want {
			t.Errorf("%v.ExitCode() = %d, want %d", tc.st, got, tc.want)
		}
	}
}

func TestRunErrors(t *testing.T) {
	e := newEnv(t)
	plain := filepath.Join(t.TempDir(), "plain")
	if err := os.WriteFile(plain, []byte("not a program"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cmd  Command
		code string // proto error code; "" for a local validation error
	}{
		{"not found", Command{Argv: []string{"no-such-command-hpcvm"}}, proto.CodeNotFound},
		{"missing dir", Command{Argv: []string{"true"}, Dir: "/no/such/dir"}, proto.CodeNotFound},
		{"not executable", Command{Argv: []string{plain}}, proto.CodePermission},
		{"empty argv", Command{}, ""},
		{"relative dir", Command{Argv: []string{"true"}, Dir: "tmp"}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.cl.Run(ctx(t), tc.cmd, nil, nil)
			if err == nil {
				t.Fatal("no error")
			}
			var pe *proto.Error
			if tc.code == "" {
				if errors.As(err, &pe) {
					t.Fatalf("got agent error %v, want a local validation error", err)
				}
				return
			}
			if !errors.As(err, &pe) || pe.Code != tc.code {
				t.Fatalf("error %v, want agent error code %s", err, tc.code)
			}
		})
	}
}

func TestLargeOutputIntact(t *testing.T) {
	if testing.Short() {
		t.Skip("100 MB transfer skipped in -short mode")
	}
	e := newEnv(t)
	const size = 100 << 20
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i+8 <= len(data); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			data[i+j] = byte(v >> (8 * j))
		}
	}
	file := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	hOut, hErr := sha256.New(), sha256.New()
	// Both streams at once, to check frames of the two never mix.
	st, err := e.cl.Run(ctx(t), Command{Argv: []string{"sh", "-c", `cat "$1" & cat "$1" >&2; wait`, "sh", file}}, hOut, hErr)
	if err != nil || st != (ExitStatus{}) {
		t.Fatalf("Run: %v %v", st, err)
	}
	if got := hOut.Sum(nil); !bytes.Equal(got, want[:]) {
		t.Errorf("stdout sha256 %x, want %x", got, want)
	}
	if got := hErr.Sum(nil); !bytes.Equal(got, want[:]) {
		t.Errorf("stderr sha256 %x, want %x", got, want)
	}
}

func TestLargeStdin(t *testing.T) {
	e := newEnv(t)
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<20) // 16 MiB
	var out bytes.Buffer
	st, err := e.cl.Run(ctx(t), Command{Argv: []string{"sha256sum"}, Stdin: bytes.NewReader(data)}, &out, nil)
	if err != nil || st.Code != 0 {
		t.Fatalf("Run: %v %v", st, err)
	}
	want := fmt.Sprintf("%x  -\n", sha256.Sum256(data))
	if out.String() != want {
		t.Fatalf("sha256sum said %q, want %q", out.String(), want)
	}
}

func TestRunAsUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a command as uid 65534")
	}
	e := newEnv(t)
	var out bytes.Buffer
	st, err := e.cl.Run(ctx(t), Command{Argv: []string{"sh", "-c", "id -u; id -g; id -G"}, Cred: &Cred{UID: 65534, GID: 65534}}, &out, nil)
	if err != nil || st.Code != 0 {
		t.Fatalf("Run: %v %v", st, err)
	}
	if want := "65534\n65534\n65534\n"; out.String() != want {
		t.Fatalf("id printed %q, want %q", out.String(), want)
	}
}

func TestSignalForwarding(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	p, err := e.cl.Start(c, Command{Argv: []string{"sleep", "1000"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if st.Signal != syscall.SIGTERM || st.ExitCode() != 128+15 {
		t.Fatalf("status %v, want killed by SIGTERM", st)
	}
	// The pid is gone now: signalling it again is refused.
	var pe *proto.Error
	if err := e.cl.Signal(c, p.PID(), syscall.SIGTERM); !errors.As(err, &pe) || pe.Code != proto.CodeNotFound {
		t.Fatalf("Signal after exit: %v, want not-found", err)
	}
}

// A version 2 agent gets the signal on the command's stream: it arrives even
// when no new connection can be made (in a spread guest a connection costs
// seconds).
func TestSignalInBandNeedsNoConnection(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	p, err := e.cl.Start(c, Command{Argv: []string{"sleep", "1000"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.cl.dial = func(context.Context) (net.Conn, error) { return nil, errors.New("no new connections in this test") }
	if err := p.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatalf("in-band Signal: %v", err)
	}
	if st, err := p.Wait(); err != nil || st.Signal != syscall.SIGTERM {
		t.Fatalf("status %v err %v, want killed by SIGTERM", st, err)
	}
	if err := p.Signal(c, syscall.SIGTERM); err == nil {
		t.Fatal("Signal after the command ended: no error")
	}
}

// A command that does not read the stdin it is sent still gets its signal:
// while stdin is open the signal takes a connection of its own.
func TestSignalPastUnreadStdin(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	stdin := &countingReader{r: bytes.NewReader(make([]byte, 16<<20))} // far more than pipes and sockets hold
	p, err := e.cl.Start(c, Command{Argv: []string{"sleep", "1000"}, Stdin: stdin}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// More than the 64 KiB pipe has been sent: the stream is backed up.
	waitFor(t, func() bool { return stdin.n.Load() >= 192<<10 })
	if err := p.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	if st, err := p.Wait(); err != nil || st.Signal != syscall.SIGTERM {
		t.Fatalf("status %v err %v, want killed by SIGTERM", st, err)
	}
}

type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// An agent that negotiated version 1 gets signals on a connection of their
// own, and a version 1 exec stream that carries a signal frame is refused.
// (Not parallel: it counts this process's sleep children.)
func TestSignalVersion1(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	p, err := e.cl.Start(c, Command{Argv: []string{"sleep", "1000"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	p.c.hi.Version = 1 // as if the agent had answered version 1
	if err := p.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	if st, err := p.Wait(); err != nil || st.Signal != syscall.SIGTERM {
		t.Fatalf("status %v err %v, want killed by SIGTERM", st, err)
	}

	// A version 1 host sending a signal frame in-band: the agent kills the
	// command rather than guess what the host meant.
	nc, err := net.Dial("unix", e.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	fr := proto.NewReader(nc)
	if err := proto.WriteMsg(nc, proto.THello, &proto.Hello{Protocol: proto.Name, Version: 1}); err != nil {
		t.Fatal(err)
	}
	m, err := proto.ReadMsg(fr, proto.THello)
	if err != nil || m.(*proto.Hello).Version != 1 {
		t.Fatalf("hello from a version 1 host: %v %v, want version 1", m, err)
	}
	if err := proto.WriteMsg(nc, proto.TExec, &proto.Exec{Argv: []string{"sleep", "1000"}}); err != nil {
		t.Fatal(err)
	}
	m, err = proto.ReadMsg(fr, proto.TStarted)
	if err != nil {
		t.Fatal(err)
	}
	pid := m.(*proto.Started).PID
	if err := proto.WriteMsg(nc, proto.TSignal, &proto.Signal{PID: pid, Signal: int(syscall.SIGTERM)}); err != nil {
		t.Fatal(err)
	}
	// As for any unexpected frame: the command is killed and the
	// connection closed.
	if f, err := fr.ReadFrame(); err == nil {
		t.Fatalf("got a %s frame, want the connection closed", f.Type)
	}
	waitFor(t, func() bool { return countSleepers(t) == 0 })
}

func TestSignalReachesProcessGroup(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	var out bytes.Buffer
	// The shell traps TERM and reports it; its child sleep is killed too.
	p, err := e.cl.Start(c, Command{Argv: []string{"sh", "-c", `trap 'echo got TERM; exit 7' TERM; echo ready; sleep 1000 & wait`}}, &syncWriter{w: &out}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(syncRead(&out), "ready") {
		time.Sleep(10 * time.Millisecond)
	}
	if err := p.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 7 || !strings.Contains(out.String(), "got TERM") {
		t.Fatalf("status %v err %v output %q", st, err, out.String())
	}
}

var outMu sync.Mutex

type syncWriter struct{ w io.Writer }

func (s *syncWriter) Write(p []byte) (int, error) {
	outMu.Lock()
	defer outMu.Unlock()
	return s.w.Write(p)
}

func syncRead(b *bytes.Buffer) string {
	outMu.Lock()
	defer outMu.Unlock()
	return b.String()
}

func TestRunCancelKills(t *testing.T) {
	e := newEnv(t)
	c, cancel := context.WithCancel(ctx(t))
	done := make(chan struct{})
	var st ExitStatus
	var err error
	go func() {
		st, err = e.cl.Run(c, Command{Argv: []string{"sleep", "1000"}}, nil, nil)
		close(done)
	}()
	// Cancel once the command runs (it shows up as a signallable pid).
	waitFor(t, func() bool { return countSleepers(t) > 0 })
	cancel()
	<-done
	if !errors.Is(err, context.Canceled) || st.Signal != syscall.SIGTERM {
		t.Fatalf("Run after cancel: %v %v, want context.Canceled and SIGTERM", st, err)
	}
}

func TestDisconnectKills(t *testing.T) {
	e := newEnv(t)
	c, cancel := context.WithCancel(ctx(t))
	pidFile := filepath.Join(t.TempDir(), "pid")
	p, err := e.cl.Start(c, Command{Argv: []string{"sh", "-c", `echo $$ > "$1"; exec sleep 1000`, "sh", pidFile}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { b, _ := os.ReadFile(pidFile); return len(b) > 0 })
	cancel() // drops the connection without any signal request
	<-p.Done()
	// The agent (this process) reaps it, so the pid disappears.
	waitFor(t, func() bool { return syscall.Kill(p.PID(), 0) == syscall.ESRCH })
}

// countSleepers is used only to know a command started; it reads no timing.
func countSleepers(t *testing.T) int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, d := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err == nil && string(b) == "sleep\x001000\x00" {
			if st, err := os.ReadFile(filepath.Join("/proc", d.Name(), "status")); err == nil &&
				strings.Contains(string(st), fmt.Sprintf("PPid:\t%d\n", os.Getpid())) {
				n++
			}
		}
	}
	return n
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 6000; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not reached within a minute")
}

func TestCopyIn(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	tests := []struct {
		name    string
		path    string
		data    []byte
		opts    CopyOptions
		wantErr string
	}{
		{"script", filepath.Join(dir, "job.sh"), []byte("#!/bin/sh\necho hi\n"), CopyOptions{Mode: 0o750}, ""},
		{"default mode", filepath.Join(dir, "data"), []byte("x"), CopyOptions{}, ""},
		{"empty file", filepath.Join(dir, "empty"), nil, CopyOptions{Mode: 0o600}, ""},
		{"big", filepath.Join(dir, "big"), bytes.Repeat([]byte{7}, 3<<20+5), CopyOptions{Mode: 0o644}, ""},
		{"mkdir", filepath.Join(dir, "a/b/c"), []byte("deep"), CopyOptions{Mode: 0o644, MkdirAll: true}, ""},
		{"missing parent", filepath.Join(dir, "x/y"), []byte("no"), CopyOptions{}, proto.CodeNotFound},
		{"relative", "rel/path", []byte("no"), CopyOptions{}, "absolute"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := e.cl.CopyIn(ctx(t), tc.path, bytes.NewReader(tc.data), tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("CopyIn: %v, want error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("CopyIn: %v", err)
			}
			got, err := os.ReadFile(tc.path)
			if err != nil || !bytes.Equal(got, tc.data) {
				t.Fatalf("content: %v (%d bytes, want %d)", err, len(got), len(tc.data))
			}
			fi, _ := os.Stat(tc.path)
			want := os.FileMode(tc.opts.Mode)
			if want == 0 {
				want = 0o644
			}
			if fi.Mode().Perm() != want {
				t.Fatalf("mode %v, want %v", fi.Mode().Perm(), want)
			}
		})
	}
	// No temporary files are left behind, also after the failed copies.
	ents, _ := os.ReadDir(dir)
	for _, d := range ents {
		if strings.Contains(d.Name(), ".hpcvm-") {
			t.Errorf("leftover temporary file %s", d.Name())
		}
	}
}

func TestSetClock(t *testing.T) {
	e := newEnv(t)
	when := time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)
	if err := e.cl.SetClock(ctx(t), when); err != nil {
		t.Fatal(err)
	}
	if len(e.clock.set) != 1 || !e.clock.set[0].Equal(when) {
		t.Fatalf("clock set to %v, want [%v]", e.clock.set, when)
	}
}

func TestFreezeThaw(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	if err := e.cl.Freeze(c, 0, "/a", "/b"); err != nil {
		t.Fatal(err)
	}
	var pe *proto.Error
	if err := e.cl.Freeze(c, 0, "/b"); !errors.As(err, &pe) || pe.Code != proto.CodeBusy {
		t.Fatalf("second freeze: %v, want busy", err)
	}
	if err := e.cl.Thaw(c); err != nil {
		t.Fatal(err)
	}
	if err := e.cl.Thaw(c, "/a"); err == nil {
		t.Fatal("thaw of a thawed filesystem succeeded")
	}
	// A failing freeze undoes the part that succeeded.
	e.freeze.fail = "/bad"
	if err := e.cl.Freeze(c, 0, "/c", "/bad"); err == nil {
		t.Fatal("freeze with a failing path succeeded")
	}
	want := []string{"freeze /a", "freeze /b", "thaw /b", "thaw /a", "freeze /c", "thaw /c"}
	if got := e.freeze.snapshot(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("freezer calls %q, want %q", got, want)
	}
}

func TestFreezeAutoThaw(t *testing.T) {
	e := newEnv(t)
	if err := e.cl.Freeze(ctx(t), 50*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-e.freeze.thawed:
		if p != "/" {
			t.Fatalf("auto-thawed %q, want /", p)
		}
	case <-time.After(time.Minute):
		t.Fatal("no auto-thaw")
	}
}

func TestPoweroffThawsFirst(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	if err := e.cl.Freeze(c, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.cl.Poweroff(c, false); err != nil {
		t.Fatal(err)
	}
	if reboot := <-e.power.calls; reboot {
		t.Fatal("poweroff became a reboot")
	}
	if got := e.freeze.snapshot(); len(got) != 2 || got[1] != "thaw /" {
		t.Fatalf("freezer calls %q, want a thaw before poweroff", got)
	}
}

func TestVersionNegotiated(t *testing.T) {
	e := newEnv(t)
	nc, err := net.Dial("unix", e.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := proto.WriteMsg(nc, proto.THello, &proto.Hello{Protocol: proto.Name, Version: proto.Version + 1}); err != nil {
		t.Fatal(err)
	}
	// A newer host is answered with the newest version both speak.
	m, err := proto.ReadMsg(proto.NewReader(nc), proto.THello)
	if err != nil || m.(*proto.Hello).Version != proto.Version {
		t.Fatalf("hello with a newer version: %v %v, want version %d", m, err, proto.Version)
	}
}
