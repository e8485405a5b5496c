// Command testreport runs `go test -json` and prints what plain `go test`
// would (a line per package, the whole output of failed tests), then ends
// with a short list of the innermost failed tests and their last lines.
//
//	go run ./test/e2e/cmd/testreport -- go test -json ./...
//
// CI shows only the head and the tail of a long log; the failure that
// matters sits in the middle, inside one package's output. The list at
// the end puts it where it is read. The exit status is the command's, or
// 1 when it exited 0 yet a test failed.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: testreport -- go test -json [packages]")
		os.Exit(2)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stderr = os.Stdin, os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(2)
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(2)
	}
	r := newReport(os.Stdout)
	if err := r.read(stdout); err != nil {
		fmt.Fprintln(os.Stderr, "testreport: read:", err)
	}
	werr := cmd.Wait()
	r.summary()
	var exit *exec.ExitError
	switch {
	case errors.As(werr, &exit):
		os.Exit(exit.ExitCode())
	case werr != nil:
		fmt.Fprintln(os.Stderr, "testreport:", werr)
		os.Exit(2)
	case r.anyFailed():
		os.Exit(1)
	}
}

// event is one line of `go test -json` (cmd/test2json's TestEvent).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

// Shown of each failed test in the summary: its last lines, each cut.
const (
	summaryLines = 5
	lineLimit    = 600
)

type outputLine struct{ test, text string }

type pkgState struct {
	lines  []outputLine
	failed map[string]bool
	order  []string // failed tests, in the order they failed
}

type report struct {
	w    io.Writer
	pkgs map[string]*pkgState
	// failures lists "pkg test" of every failed test, for the summary.
	failures []failure
}

type failure struct {
	pkg, test string
	last      []string
}

func newReport(w io.Writer) *report { return &report{w: w, pkgs: map[string]*pkgState{}} }

func (r *report) read(in io.Reader) error {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Fprintln(r.w, string(line))
			continue
		}
		r.event(e)
	}
	return sc.Err()
}

func (r *report) pkg(name string) *pkgState {
	p := r.pkgs[name]
	if p == nil {
		p = &pkgState{failed: map[string]bool{}}
		r.pkgs[name] = p
	}
	return p
}

func (r *report) event(e event) {
	switch e.Action {
	case "build-output":
		fmt.Fprint(r.w, e.Output)
		return
	case "build-fail":
		r.failures = append(r.failures, failure{pkg: e.Package, test: "(build)"})
		return
	}
	if e.Package == "" {
		return
	}
	p := r.pkg(e.Package)
	switch e.Action {
	case "output":
		p.lines = append(p.lines, outputLine{e.Test, e.Output})
	case "fail":
		if e.Test != "" {
			p.failed[e.Test] = true
			p.order = append(p.order, e.Test)
			return
		}
		r.finish(e.Package, p, true)
	case "pass", "skip":
		if e.Test == "" {
			r.finish(e.Package, p, false)
		}
	}
}

// finish prints a package's output as plain go test would: the package's
// own lines, and for a failed package the lines of its failed tests.
func (r *report) finish(name string, p *pkgState, failed bool) {
	for _, l := range p.lines {
		// -json runs tests verbosely; plain go test prints a passing
		// package's "PASS" only with -v.
		if l.test == "" && !failed && l.text == "PASS\n" {
			continue
		}
		if l.test == "" || failed && p.failed[l.test] {
			fmt.Fprint(r.w, l.text)
		}
	}
	if failed && len(p.order) == 0 {
		r.failures = append(r.failures, failure{pkg: name, test: "(package)", last: lastLines(p.lines, "", summaryLines)})
	}
	for _, t := range p.order {
		if innermost(t, p.order) {
			r.failures = append(r.failures, failure{pkg: name, test: t, last: lastLines(p.lines, t, summaryLines)})
		}
	}
	delete(r.pkgs, name)
}

func innermost(t string, failed []string) bool {
	for _, o := range failed {
		if strings.HasPrefix(o, t+"/") {
			return false
		}
	}
	return true
}

// lastLines is the last n lines of test's output that say something: not
// go test's own headers and results.
func lastLines(lines []outputLine, test string, n int) []string {
	var out []string
	for i := len(lines) - 1; i >= 0 && len(out) < n; i-- {
		if lines[i].test != test {
			continue
		}
		s := strings.TrimSpace(lines[i].text)
		if s == "" || strings.HasPrefix(s, "=== ") || strings.HasPrefix(s, "--- ") || s == "FAIL" || s == "PASS" {
			continue
		}
		if strings.HasPrefix(s, "FAIL\t") || strings.HasPrefix(s, "ok  \t") {
			continue
		}
		if len(s) > lineLimit {
			s = s[:lineLimit] + "…"
		}
		out = append(out, s)
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

func (r *report) anyFailed() bool { return len(r.failures) > 0 }

// summary lists the failures; packages still open (the command died) are
// finished first so that nothing is lost.
func (r *report) summary() {
	for name, p := range r.pkgs {
		r.finish(name, p, len(p.order) > 0)
	}
	if len(r.failures) == 0 {
		return
	}
	fmt.Fprintf(r.w, "\n%d failed (innermost tests; whole output above):\n", len(r.failures))
	for _, f := range r.failures {
		fmt.Fprintf(r.w, "FAIL %s %s\n", f.pkg, f.test)
		for _, l := range f.last {
			fmt.Fprintf(r.w, "    %s\n", l)
		}
	}
}
