package main

import (
	"os"
	"path/filepath"
	"testing"
)

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
