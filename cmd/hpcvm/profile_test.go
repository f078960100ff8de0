package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/dsm"
)

func TestStatsReporter(t *testing.T) {
	if every, f, err := statsReporter("", 0, nil); every != 0 || f != nil || err != nil {
		t.Errorf("unset: %v %v %v, want off", every, f != nil, err)
	}
	for _, bad := range []string{"soon", "10ms", "-1s"} {
		if _, _, err := statsReporter(bad, 0, nil); err == nil || !strings.Contains(err.Error(), StatsEveryEnv) {
			t.Errorf("%q: error %v, want one naming %s", bad, err, StatsEveryEnv)
		}
	}
	var b strings.Builder
	every, f, err := statsReporter("5s", 1, &b)
	if err != nil || every != 5*time.Second {
		t.Fatalf("5s: %v %v", every, err)
	}
	f(dsm.StatsSnapshot{Requests: 7, BytesSent: 4096, BytesReceived: 8192, ZeroFilled: 64})
	for _, want := range []string{`msg="slice stats"`, "slice=1", "requests=7", "bytes_sent=4096", "bytes_received=8192", "zero_filled=64"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("logged %q, want %s in it", b.String(), want)
		}
	}
}

func TestStartCPUProfileWritesPerSliceFile(t *testing.T) {
	dir := t.TempDir()
	stop, err := startCPUProfile(filepath.Join(dir, "slice-%d.pprof"), 3)
	if err != nil {
		t.Fatal(err)
	}
	stop()
	fi, err := os.Stat(filepath.Join(dir, "slice-3.pprof"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() == 0 {
		t.Error("empty profile")
	}
	if stop, err := startCPUProfile("", 0); err != nil {
		t.Errorf("no path: %v", err)
	} else {
		stop()
	}
	if _, err := startCPUProfile(filepath.Join(dir, "missing", "p"), 0); err == nil {
		t.Error("a profile in a missing directory: no error")
	}
}
