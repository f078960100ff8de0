package main

import (
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
)

// CPUProfileEnv names a file for a Go CPU profile of the whole `hpcvm
// slice` run ("%d" in it becomes the slice id, for slices sharing a
// directory): where a slice's own CPU time goes, next to its vCPUs' (read
// it with `go tool pprof`). It travels to every slice in a Slurm job's
// environment.
const CPUProfileEnv = "HPCVM_SLICE_CPUPROFILE"

// startCPUProfile starts profiling into path (nothing if path is empty)
// and returns the function that ends the profile and closes the file.
func startCPUProfile(path string, id int) (func(), error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(strings.ReplaceAll(path, "%d", strconv.Itoa(id)))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}
