package imagevm

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/client"
	"github.com/hpcvm/hpcvm/guest/agent/server"
)

// slowListener hands out each connection only after delay, like an agent
// in a slow guest: the connection is established, the hello comes late.
type slowListener struct {
	net.Listener
	delay time.Duration
}

func (l slowListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		time.Sleep(l.delay)
	}
	return c, err
}

// A listening agent that takes longer than client.WaitReady's per-ping
// bound (2 s at a 200 ms interval) to answer must still be found ready:
// with that bound every ping was cut short and the boot wait went on.
func TestWaitAgentSlowAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := server.New(server.Config{Version: "test"})
	go srv.Serve(ctx, slowListener{l, 3 * time.Second})

	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	start := time.Now()
	if err := WaitAgent(wctx, client.New(client.Unix(sock))); err != nil {
		t.Fatalf("slow agent not found ready: %v", err)
	}
	t.Logf("ready after %v", time.Since(start).Round(time.Millisecond))
}

func TestWaitAgentGivesUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := WaitAgent(ctx, client.New(client.Unix(filepath.Join(t.TempDir(), "none.sock"))))
	if err == nil {
		t.Fatal("no agent, but WaitAgent returned nil")
	}
}
