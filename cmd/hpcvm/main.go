// Command hpcvm is the single entry point of hpcvm: the VMM, the policy
// engine, the image tools and the Slurm job launcher are subcommands.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// command is one top-level subcommand. run gets the arguments after the
// subcommand name and returns the process exit status.
type command struct {
	summary string
	run     func(args []string) int
}

// commands is filled by each subcommand's file in its init function, so the
// subcommands stay independent of each other.
var commands = map[string]command{}

func register(name, summary string, run func(args []string) int) {
	commands[name] = command{summary: summary, run: run}
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: hpcvm COMMAND [ARGS...]\n\ncommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(os.Stderr, "\nRun 'hpcvm COMMAND --help' for a command's options.\n")
}

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		if len(os.Args) < 2 {
			os.Exit(2)
		}
		return
	}
	c, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "hpcvm: unknown command %q (known: %s)\n", os.Args[1], strings.Join(keys(), ", "))
		os.Exit(2)
	}
	os.Exit(c.run(os.Args[2:]))
}

// parseFlags parses args quietly: a bad flag gets a one-line error naming
// the command, --help the full usage. It returns the exit status to use and
// false when the command must not go on.
func parseFlags(fs *flag.FlagSet, args []string) (int, bool) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stderr)
			fs.Usage()
			return 0, false
		}
		fmt.Fprintf(os.Stderr, "%s: %v (see %s --help)\n", fs.Name(), err, fs.Name())
		return 2, false
	}
	return 0, true
}

func keys() []string {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
