package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runMap(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("map", "[--json] IMAGE|DIR",
		"Lists the allocated ranges of the virtual disk and where they are stored in the file;\n"+
			"for a stack directory, which delta provides each range.", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one IMAGE or DIR")
	}
	if ploop.IsStackDir(pos[0]) {
		return mapStack(pos[0], *asJSON, stdout, stderr)
	}
	img, err := ploop.Open(pos[0], ploop.OpenOptions{ReadOnly: true})
	if err != nil {
		return failf(stderr, "map", err)
	}
	defer img.Close()
	m := img.Map()
	if *asJSON {
		if m == nil {
			m = []ploop.Mapping{}
		}
		b, err := json.MarshalIndent(m, "", "  ")
		if err != nil {
			return failf(stderr, "map", err)
		}
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	fmt.Fprintf(stdout, "%-20s %-20s %s\n", "Offset", "Length", "File offset")
	for _, r := range m {
		fmt.Fprintf(stdout, "%-20d %-20d %d\n", r.Offset, r.Length, r.Host)
	}
	return exitOK
}

func mapStack(dir string, asJSON bool, stdout, stderr io.Writer) int {
	s, err := ploop.OpenStack(dir, ploop.StackOptions{ReadOnly: true})
	if err != nil {
		return failf(stderr, "map", err)
	}
	defer s.Close()
	m, err := s.Map()
	if err != nil {
		return failf(stderr, "map", err)
	}
	if asJSON {
		if m == nil {
			m = []ploop.StackMapping{}
		}
		b, err := json.MarshalIndent(m, "", "  ")
		if err != nil {
			return failf(stderr, "map", err)
		}
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	fmt.Fprintf(stdout, "%-20s %-20s %-38s %s\n", "Offset", "Length", "Delta", "File")
	for _, r := range m {
		fmt.Fprintf(stdout, "%-20d %-20d %-38s %s\n", r.Offset, r.Length, r.GUID, r.File)
	}
	return exitOK
}
