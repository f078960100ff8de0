// Command hpcvm-agent is the guest agent: it runs inside every image built by
// hpcvm (started at boot by a systemd unit) and serves the agent protocol
// (docs/agent.md) on a vsock port, so the host can run commands, copy files,
// freeze filesystems, set the clock and power the guest off.
//
// It must be a static binary (CGO_ENABLED=0): it is copied into images of
// any distribution and release.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
	"github.com/hpcvm/hpcvm/guest/agent/server"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run())
}

func run() int {
	port := flag.Uint("port", proto.DefaultPort, "vsock port to listen on")
	listen := flag.String("listen", "", "listen on unix:PATH or tcp:ADDR instead of vsock (testing outside a VM; TCP has no authentication)")
	debug := flag.Bool("debug", false, "log every request")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Printf("hpcvm-agent %s (protocol %d)\n", version, proto.Version)
		return 0
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	l, err := listenWithRetry(ctx, log, *listen, uint32(*port))
	if err != nil {
		log.Error("listen", "err", err)
		return 1
	}
	log.Info("hpcvm-agent listening", "addr", l.Addr().String(), "version", version, "protocol", proto.Version)
	srv := server.New(server.Config{
		Version: version,
		Logger:  log,
		Clock:   server.SystemClock{},
		Freezer: server.FSFreezer{},
		Power:   server.SystemPower{},
	})
	if err := srv.Serve(ctx, l); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("serve", "err", err)
		return 1
	}
	return 0
}

// listenWithRetry retries the vsock listen for a while: early in boot the
// virtio vsock transport module may not be loaded yet.
func listenWithRetry(ctx context.Context, log *slog.Logger, addr string, port uint32) (net.Listener, error) {
	if addr != "" {
		network, a, ok := strings.Cut(addr, ":")
		if !ok || (network != "unix" && network != "tcp") {
			return nil, fmt.Errorf("--listen %q: want unix:PATH or tcp:HOST:PORT", addr)
		}
		if network == "unix" {
			os.Remove(a) // a stale socket from an earlier run
		}
		return net.Listen(network, a)
	}
	delay := 100 * time.Millisecond
	deadline := time.Now().Add(60 * time.Second)
	for {
		// CID_ANY: no need for /dev/vsock to learn our own CID, and the
		// VMM may renumber the guest (e.g. after a restore).
		l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
		if err == nil {
			return l, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("vsock port %d: %w", port, err)
		}
		log.Warn("vsock not ready, retrying", "port", port, "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}
