package main

import (
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
