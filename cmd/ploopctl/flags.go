package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// newVerbFlags returns the flag set of one verb: errors and usage go to
// stderr, and usage starts with the verb's synopsis and description.
func newVerbFlags(name, synopsis, description string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: ploopctl %s %s\n%s\n", name, synopsis, description)
		fs.PrintDefaults()
	}
	return fs
}

// parseVerbArgs parses flags that may come before, between or after the
// positional arguments ("ploopctl info IMAGE --json"); "--" ends flags. It
// returns the positional arguments, or an exit status when parsing ended
// the command (exitOK for --help, exitUsage for a bad flag).
func parseVerbArgs(fs *flag.FlagSet, args []string) ([]string, int, bool) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, exitOK, false
			}
			return nil, exitUsage, false
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, 0, true
		}
		// fs.Parse stops at the first non-flag, or after "--".
		if len(args) > len(rest) && args[len(args)-len(rest)-1] == "--" {
			return append(positional, rest...), 0, true
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// usageError prints a usage error for verb and returns exitUsage.
func usageError(fs *flag.FlagSet, stderr io.Writer, format string, args ...any) int {
	fmt.Fprintf(stderr, "ploopctl %s: %s\n", fs.Name(), fmt.Sprintf(format, args...))
	fs.Usage()
	return exitUsage
}

// failf prints an error for verb and returns exitFail.
func failf(stderr io.Writer, verb string, err error) int {
	msg := err.Error()
	if !strings.HasSuffix(msg, "\n") {
		msg += "\n"
	}
	fmt.Fprintf(stderr, "ploopctl %s: %s", verb, msg)
	return exitFail
}
