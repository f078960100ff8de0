package launcher

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestVMMArgs(t *testing.T) {
	p := &Plan{JobID: "7", StepID: "0", Nodes: []string{"n1"}, RuntimeDir: "/run/hpcvm/7.0",
		VM: VMSpec{Kernel: "/k", Initrd: "/i", Disk: "/store/img/disk.raw", DiskMode: DiskModeCopy,
			Cmdline: "root=/dev/vda", CPUs: 2, MemBytes: 1 << 30}}
	want := []string{"--kernel", "/k", "--cpus", "2", "--mem", "1024MiB", "--cmdline", "root=/dev/vda",
		"--vsock", "/run/hpcvm/7.0/vsock.sock", "--console", "/run/hpcvm/7.0/console.log", "--stop-signal=SIGUSR1",
		"--initrd", "/i", "--disk", "/store/img/disk.raw,overlay=/run/hpcvm/7.0/disk.overlay"}
	if got := p.VMMArgs(); !slices.Equal(got, want) {
		t.Errorf("copy mode: VMMArgs =\n%q\nwant\n%q", got, want)
	}
	p.VM.DiskMode = DiskModeShared
	if got := p.VMMArgs(); got[len(got)-1] != "/store/img/disk.raw,ro" {
		t.Errorf("ro mode: --disk %q, want the image's disk read-only", got[len(got)-1])
	}
	p.VM.Disk = ""
	if got := p.VMMArgs(); slices.Contains(got, "--disk") {
		t.Errorf("no disk: %q", got)
	}
}

// fakeVMM writes a VMM script that creates its disk's overlay like the
// real one (refusing an existing file), records its arguments and then
// runs body.
func fakeVMM(t *testing.T, dir, body string) string {
	t.Helper()
	script := filepath.Join(dir, "vmm.sh")
	err := os.WriteFile(script, []byte(`#!/bin/sh
echo "$@" > `+dir+`/args
for a; do
	case "$a" in
	*,overlay=*) set -C; : > "${a#*,overlay=}" || exit 9; set +C ;;
	esac
done
`+body+"\n"), 0o755)
	if err != nil {
		t.Fatal(err)
	}
	return script
}

// TestRunSliceDiskOverlayRemoved runs slice 0 with a fake VMM: the VMM
// gets the image's disk with an overlay in the runtime directory (a stale
// one from an earlier run is removed first), and the overlay is gone when
// the slice ends, both after a poweroff and after a stop.
func TestRunSliceDiskOverlayRemoved(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating cgroups needs root")
	}
	for _, tc := range []struct {
		name, body string
		stop       bool
	}{
		{"poweroff", "exit 0", false},
		{"stopped", `trap 'exit 0' USR1; trap '' TERM; while :; do sleep 0.1; done`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "disk.raw")
			if err := os.WriteFile(base, []byte("image"), 0o644); err != nil {
				t.Fatal(err)
			}
			p := &Plan{JobID: fmt.Sprint(os.Getpid()), StepID: tc.name, Cluster: "unit", Nodes: []string{"n1"},
				RuntimeDir: filepath.Join(dir, "run"), VMM: []string{fakeVMM(t, dir, tc.body)},
				Cgroup: CgroupLimits{MemoryMax: 256 << 20, PidsMax: 64, CPUWeight: 100},
				VM:     VMSpec{Kernel: "/k", Disk: base, DiskMode: DiskModeCopy, CPUs: 1, MemBytes: 256 << 20}}
			if err := os.MkdirAll(p.RuntimeDir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p.DiskOverlay(), nil, 0o600); err != nil { // stale
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- RunSlice(ctx, p, 0, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
			if tc.stop {
				// Wait for the VMM to have made its overlay, then stop.
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
					if _, err := os.Stat(filepath.Join(dir, "args")); err == nil {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("the fake VMM did not start")
					}
				}
				time.Sleep(200 * time.Millisecond)
				cancel()
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("RunSlice: %v", err)
				}
			case <-time.After(SliceStopGrace + 10*time.Second):
				t.Fatal("RunSlice did not return")
			}
			args, err := os.ReadFile(filepath.Join(dir, "args"))
			if err != nil {
				t.Fatal(err)
			}
			if want := " --disk " + base + ",overlay=" + p.DiskOverlay(); !strings.Contains(string(args), want) {
				t.Errorf("VMM arguments %q lack %q", args, want)
			}
			if _, err := os.Stat(p.DiskOverlay()); !os.IsNotExist(err) {
				t.Errorf("disk overlay left after the slice: %v", err)
			}
			if b, _ := os.ReadFile(base); string(b) != "image" {
				t.Errorf("the image's disk changed: %q", b)
			}
		})
	}
}
