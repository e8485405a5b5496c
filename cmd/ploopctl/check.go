package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("check", "[--repair] [--json] IMAGE|DIR",
		"Checks a ploop image for inconsistencies (in-use mark, bad data_off, BAT entries outside the file,\n"+
			"inside the BAT, misaligned or duplicated, leaked or truncated space) and with --repair fixes them.\n"+
			"For a stack directory every delta is checked, and files left by an interrupted snapshot, merge or\n"+
			"descriptor write are reported (and removed by --repair).\n"+
			"Exit status: 0 clean (or repaired), 1 problems remain or the image cannot be read, 2 usage error.", stderr)
	repair := fs.Bool("repair", false, "fix the problems found")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one IMAGE or DIR")
	}
	if ploop.IsStackDir(pos[0]) {
		return checkStack(pos[0], *repair, *asJSON, stdout, stderr)
	}
	var rep *ploop.Report
	var err error
	if *repair {
		rep, err = ploop.Repair(pos[0])
	} else {
		rep, err = ploop.Check(pos[0])
	}
	if rep != nil {
		if *asJSON {
			b, jerr := rep.JSON()
			if jerr != nil {
				return failf(stderr, "check", jerr)
			}
			fmt.Fprintf(stdout, "%s\n", b)
		} else {
			fmt.Fprint(stdout, rep.String())
		}
	}
	if err != nil {
		return failf(stderr, "check", err)
	}
	if !rep.Clean() {
		return exitFail
	}
	return exitOK
}

func checkStack(dir string, repair, asJSON bool, stdout, stderr io.Writer) int {
	var rep *ploop.StackReport
	var err error
	if repair {
		rep, err = ploop.RepairStack(dir)
	} else {
		rep, err = ploop.CheckStack(dir)
	}
	if rep != nil {
		if asJSON {
			b, jerr := json.MarshalIndent(rep, "", "  ")
			if jerr != nil {
				return failf(stderr, "check", jerr)
			}
			fmt.Fprintf(stdout, "%s\n", b)
		} else {
			fmt.Fprint(stdout, rep.String())
		}
	}
	if err != nil {
		return failf(stderr, "check", err)
	}
	if !rep.Clean() {
		return exitFail
	}
	return exitOK
}
