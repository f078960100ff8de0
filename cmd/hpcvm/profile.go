package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/hpcvm/hpcvm/vmm/dsm"
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

// ProfileEnv is the default of `hpcvm slice --profile` (a period such as
// 10ms): where the vCPUs are, sampled, in each slice's JSON summary, for
// slices started by the Slurm launcher (with VMMLogEnv to keep them).
const ProfileEnv = "HPCVM_SLICE_PROFILE"

// TimerSlackEnv is the default of `hpcvm slice --timer-slack` (e.g. 10ms),
// for slices started by the Slurm launcher.
const TimerSlackEnv = "HPCVM_SLICE_TIMER_SLACK"

// VMMLogEnv names a file `hpcvm launch` appends the slices' (or the
// VMM's) stdout and stderr to, instead of its runtime directory's vmm.log,
// which is removed with the job.
const VMMLogEnv = "HPCVM_VMM_LOG"

// StatsEveryEnv, a Go duration (e.g. 5s), makes `hpcvm slice` log its
// counters at that period on stderr (msg="slice stats"): page requests
// and bytes moved over time, so that a job's phases (boot, onlining, the
// program) can be told apart (docs/dsm.md). Like CPUProfileEnv it travels
// to every slice in a Slurm job's environment.
const StatsEveryEnv = "HPCVM_SLICE_STATS_EVERY"

// statsReporter returns the period v gives (StatsEveryEnv's value; 0 if
// empty) and the function that logs one sample of slice id's counters to w.
func statsReporter(v string, id int, w io.Writer) (time.Duration, func(dsm.StatsSnapshot), error) {
	if v == "" {
		return 0, nil, nil
	}
	every, err := time.ParseDuration(v)
	if err != nil || every < 100*time.Millisecond {
		return 0, nil, fmt.Errorf("%s=%q: want a duration of at least 100ms", StatsEveryEnv, v)
	}
	lg := slog.New(slog.NewTextHandler(w, nil))
	return every, func(st dsm.StatsSnapshot) {
		lg.Info("slice stats", "slice", id, "read_faults", st.ReadFaults, "write_faults", st.WriteFaults,
			"requests", st.Requests, "home_served", st.HomeServed, "fetches", st.Fetches,
			"invalidations", st.Invalidations, "zero_filled", st.ZeroFilled, "io_forwarded", st.IOForwarded,
			"irqs_sent", st.IRQsSent, "bytes_sent", st.BytesSent, "bytes_received", st.BytesReceived)
	}, nil
}
