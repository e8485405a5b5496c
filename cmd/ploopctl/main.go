// Command ploopctl is the operator's tool for ploop images and stacks: it
// creates, inspects, checks, converts and serves them. Verbs follow OpenVZ's
// ploop tool where one exists and qemu-img otherwise.
//
// Exit status: 0 success, 1 failure (or problems found by check), 2 usage error.
package main

import (
	"fmt"
	"io"
	"os"
	"sort"
)

// verb is one ploopctl subcommand. run returns the process exit status.
type verb struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

func verbs() map[string]verb {
	return map[string]verb{
		// Each verb lives in its own file; add new ones here.
		"create":  {"create an empty ploop image", runCreate},
		"info":    {"show an image's size, geometry and allocation", runInfo},
		"check":   {"check (and --repair) an image's consistency", runCheck},
		"convert": {"copy an image between raw and ploop formats", runConvert},
		"map":     {"list the allocated ranges of an image", runMap},

		"init":            {"create a ploop stack directory (DiskDescriptor.xml + root.hds)", runInit},
		"snapshot":        {"snapshot a stack directory (prints the GUID)", runSnapshot},
		"snapshot-list":   {"list the snapshots (deltas) of a stack directory", runSnapshotList},
		"snapshot-delete": {"delete a snapshot by merging its delta", runSnapshotDelete},
		"clone":           {"make a new stack directory from a snapshot", runClone},
		"flatten":         {"copy shared clusters into a stack's own delta", runFlatten},
		"grow":            {"grow the virtual disk of a stack directory", runGrow},
		"compact":         {"give back the space of discarded and zero clusters", runCompact},

		"serve":  {"serve an image over NBD (unix socket or TCP)", runServe},
		"attach": {"serve an image to a kernel /dev/nbdN, optionally mounted", runAttach},
		"detach": {"stop the attach serving /dev/nbdN", runDetach},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	vs := verbs()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout, vs)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	v, ok := vs[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "ploopctl: unknown verb %q (try ploopctl --help)\n", args[0])
		return exitUsage
	}
	return v.run(args[1:], stdout, stderr)
}

func usage(w io.Writer, vs map[string]verb) {
	fmt.Fprintln(w, "usage: ploopctl VERB [flags] ARGS   (ploopctl VERB --help for details)")
	names := make([]string, 0, len(vs))
	for n := range vs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-16s %s\n", n, vs[n].summary)
	}
}
