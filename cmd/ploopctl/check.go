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
	dir := ploop.IsStackDir(pos[0])
	var rep checkReport
	var err error
	switch {
	case dir && *repair:
		rep, err = nilIfNil(ploop.RepairStack(pos[0]))
	case dir:
		rep, err = nilIfNil(ploop.CheckStack(pos[0]))
	case *repair:
		rep, err = nilIfNil(ploop.Repair(pos[0]))
	default:
		rep, err = nilIfNil(ploop.Check(pos[0]))
	}
	if rep != nil {
		var jerr error
		if *asJSON {
			jerr = printJSON(stdout, rep)
		} else {
			_, jerr = fmt.Fprint(stdout, rep.String())
		}
		if jerr != nil {
			return failf(stderr, "check", jerr)
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

// checkReport is what Check/Repair of an image and of a stack both return.
type checkReport interface {
	String() string
	Clean() bool
}

// nilIfNil keeps a nil *Report or *StackReport from becoming a non-nil
// interface value.
func nilIfNil[R interface {
	*ploop.Report | *ploop.StackReport
	checkReport
}](r R, err error) (checkReport, error) {
	if r == nil {
		return nil, err
	}
	return r, err
}

// printJSON prints v indented; an image report marshals its own (JSON()),
// so an empty problem list prints as [] rather than null.
func printJSON(w io.Writer, v any) error {
	var b []byte
	var err error
	if r, ok := v.(interface{ JSON() ([]byte, error) }); ok {
		b, err = r.JSON()
	} else {
		b, err = json.MarshalIndent(v, "", "  ")
	}
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}
