package client

import (
	"bufio"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// fakeHybridVsock plays a VMM's hybrid vsock socket: it reads
// "CONNECT <port>\n" and, for the agent's port, answers "OK <hostport>\n"
// and splices the stream to the agent's Unix socket.
func fakeHybridVsock(t *testing.T, agentSock string, agentPort string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vsock.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// Byte-wise, like a VMM that hands the rest to the guest.
				line, err := readLine(c, 64)
				if err != nil {
					return
				}
				if line != "CONNECT "+agentPort {
					return // a VMM closes the connection: nobody listens
				}
				a, err := net.Dial("unix", agentSock)
				if err != nil {
					return
				}
				defer a.Close()
				io.WriteString(c, "OK 1073741824\n")
				go io.Copy(a, c)
				io.Copy(c, a)
			}()
		}
	}()
	return path
}

func TestHybridVsock(t *testing.T) {
	e := newEnv(t)
	vs := fakeHybridVsock(t, e.sock, "1024")
	cl := New(HybridVsock(vs, 1024))
	if _, err := cl.Ping(ctx(t)); err != nil {
		t.Fatalf("Ping over hybrid vsock: %v", err)
	}
	var out strings.Builder
	st, err := cl.Run(ctx(t), Command{Argv: []string{"echo", "through vsock"}}, &out, nil)
	if err != nil || st.Code != 0 || out.String() != "through vsock\n" {
		t.Fatalf("Run: %v %v %q", st, err, out.String())
	}
	// Wrong port: the VMM closes the connection; the error says so.
	_, err = New(HybridVsock(vs, 99)).Ping(ctx(t))
	if err == nil || !strings.Contains(err.Error(), "CONNECT 99") {
		t.Fatalf("Ping on a port without listener: %v", err)
	}
}

func TestReadLine(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"OK 5\nrest", "OK 5", true},
		{"OK 5", "", false},
		{strings.Repeat("x", 100) + "\n", "", false},
	}
	for _, tc := range tests {
		r := bufio.NewReader(strings.NewReader(tc.in))
		got, err := readLine(r, 64)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("readLine(%q) = %q, %v", tc.in, got, err)
		}
	}
}
