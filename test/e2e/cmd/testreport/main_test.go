package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestReport(t *testing.T) {
	ev := func(action, pkg, test, out string) string {
		b, _ := json.Marshal(event{Action: action, Package: pkg, Test: test, Output: out})
		return string(b)
	}
	tests := []struct {
		name      string
		lines     []string
		want      []string // in order
		notWant   []string
		anyFailed bool
	}{
		{
			name: "passing package prints one line",
			lines: []string{
				ev("start", "p/ok", "", ""),
				ev("output", "p/ok", "TestA", "=== RUN   TestA\n"),
				ev("output", "p/ok", "TestA", "    a_test.go:1: noise\n"),
				ev("pass", "p/ok", "TestA", ""),
				ev("output", "p/ok", "", "PASS\n"),
				ev("output", "p/ok", "", "ok  \tp/ok\t0.1s\n"),
				ev("pass", "p/ok", "", ""),
			},
			want:    []string{"ok  \tp/ok\t0.1s"},
			notWant: []string{"noise", "failed", "PASS"},
		},
		{
			name: "failed subtest: its output, then the summary names it with its last lines",
			lines: []string{
				ev("output", "p/bad", "TestK", "=== RUN   TestK\n"),
				ev("output", "p/bad", "TestK/A", "=== RUN   TestK/A\n"),
				ev("output", "p/bad", "TestK/A", "    a_test.go:1: first\n"),
				ev("output", "p/bad", "TestK/A", "    a_test.go:2: boom\n"),
				ev("output", "p/bad", "TestK/A", "    --- FAIL: TestK/A (0.00s)\n"),
				ev("fail", "p/bad", "TestK/A", ""),
				ev("output", "p/bad", "TestK/B", "    b_test.go:1: passing noise\n"),
				ev("pass", "p/bad", "TestK/B", ""),
				ev("output", "p/bad", "TestK", "--- FAIL: TestK (0.00s)\n"),
				ev("fail", "p/bad", "TestK", ""),
				ev("output", "p/bad", "", "FAIL\tp/bad\t0.2s\n"),
				ev("fail", "p/bad", "", ""),
				"not json: a build error",
			},
			want:      []string{"a_test.go:1: first", "FAIL\tp/bad", "not json", "1 failed", "FAIL p/bad TestK/A", "    a_test.go:1: first", "    a_test.go:2: boom"},
			notWant:   []string{"passing noise", "FAIL p/bad TestK\n"},
			anyFailed: true,
		},
		{
			name: "package failing without a test (panic in init, timeout)",
			lines: []string{
				ev("output", "p/panic", "", "panic: boom\n"),
				ev("output", "p/panic", "", "FAIL\tp/panic\t0.0s\n"),
				ev("fail", "p/panic", "", ""),
			},
			want:      []string{"panic: boom", "FAIL p/panic (package)", "    panic: boom"},
			anyFailed: true,
		},
		{
			name: "a command that died leaves its failed tests reported",
			lines: []string{
				ev("output", "p/cut", "TestX", "    x_test.go:1: last words\n"),
				ev("fail", "p/cut", "TestX", ""),
			},
			want:      []string{"last words", "FAIL p/cut TestX", "    x_test.go:1: last words"},
			anyFailed: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			r := newReport(&out)
			if err := r.read(strings.NewReader(strings.Join(tt.lines, "\n") + "\n")); err != nil {
				t.Fatal(err)
			}
			r.summary()
			got := out.String()
			at := 0
			for _, w := range tt.want {
				i := strings.Index(got[at:], w)
				if i < 0 {
					t.Fatalf("output lacks %q after byte %d:\n%s", w, at, got)
				}
				at += i + len(w)
			}
			for _, w := range tt.notWant {
				if strings.Contains(got, w) {
					t.Errorf("output holds %q:\n%s", w, got)
				}
			}
			if r.anyFailed() != tt.anyFailed {
				t.Errorf("anyFailed = %t, want %t", r.anyFailed(), tt.anyFailed)
			}
		})
	}
}

// FuzzReport: any stream (JSON events, other lines, garbage) is read
// without a panic, and every failure listed was reported as one.
func FuzzReport(f *testing.F) {
	f.Add(`{"Action":"output","Package":"p","Test":"T","Output":"x\n"}` + "\n" + `{"Action":"fail","Package":"p","Test":"T"}` + "\n" + `{"Action":"fail","Package":"p"}` + "\n")
	f.Add("not json\n{\"Action\":\"build-fail\",\"Package\":\"q\"}\n{")
	f.Fuzz(func(t *testing.T, in string) {
		var out strings.Builder
		r := newReport(&out)
		if err := r.read(strings.NewReader(in)); err != nil {
			return // a line longer than the scanner takes
		}
		r.summary()
		// The packages that some event reported failing, as JSON decoding
		// reads them (keys in any case, invalid UTF-8 replaced).
		failing := map[string]bool{}
		for _, line := range strings.Split(in, "\n") {
			var e event
			if json.Unmarshal([]byte(line), &e) == nil && (e.Action == "fail" || e.Action == "build-fail") {
				failing[e.Package] = true
			}
		}
		for _, fl := range r.failures {
			if !failing[fl.pkg] {
				t.Fatalf("failure of package %q, which no event reported failing", fl.pkg)
			}
		}
	})
}
