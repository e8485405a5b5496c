package main

import (
	"math"
	"strings"
	"testing"
	"time"
)

// fioJSON is the shape of fio 3.33's --output-format=json, cut down.
const fioJSON = `{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "bench",
      "error" : 0,
      "read" : { "io_bytes" : 1048576, "bw_bytes" : 2097152, "bw" : 2048, "iops" : 512.5 },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "bw" : 0, "iops" : 0.0 }
    }
  ]
}`

func TestParseFio(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want fioResult
		err  string
	}{
		{"read", fioJSON, fioResult{IOPS: 512.5, MiBs: 2}, ""},
		{"warnings first", "fio: some warning\n" + fioJSON, fioResult{IOPS: 512.5, MiBs: 2}, ""},
		{"write", strings.NewReplacer(`"iops" : 512.5`, `"iops" : 0`, `"iops" : 0.0`, `"iops" : 7`,
			`"bw_bytes" : 0,`, `"bw_bytes" : 1048576,`).Replace(fioJSON), fioResult{IOPS: 7, MiBs: 3}, ""},
		{"no JSON", "fio: bad option\n", fioResult{}, "no JSON"},
		{"truncated", fioJSON[:60], fioResult{}, "fio's JSON"},
		{"job error", strings.Replace(fioJSON, `"error" : 0`, `"error" : 5`, 1), fioResult{}, "error 5"},
		{"two jobs", `{"jobs":[{},{}]}`, fioResult{}, "2 jobs"},
		{"no I/O", `{"jobs":[{"read":{"iops":0},"write":{"iops":0}}]}`, fioResult{}, "no I/O"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseFio([]byte(tt.in))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parseFio: %v, %v; want an error with %q", got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseFio: %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func FuzzParseFio(f *testing.F) {
	f.Add([]byte(fioJSON))
	f.Add([]byte("x{"))
	f.Add([]byte(`{"jobs":[{"read":{"iops":-1}}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := parseFio(data)
		if err == nil && !(r.IOPS > 0) {
			t.Fatalf("accepted %q with %v IOPS", data, r.IOPS)
		}
	})
}

const status = `Name:	ploop-csi
VmPeak:	 1262424 kB
VmRSS:	   24620 kB
RssAnon:	   10908 kB
RssFile:	   13712 kB
Threads:	9
`

func TestParseStatus(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want memory
		err  string
	}{
		{"status", status, memory{RSS: 24620, Anon: 10908}, ""},
		{"no RssAnon", strings.Replace(status, "RssAnon", "RssX", 1), memory{}, "missing"},
		{"unit", strings.Replace(status, "24620 kB", "24620 MB", 1), memory{}, "not a size"},
		{"number", strings.Replace(status, "24620 kB", "-3 kB", 1), memory{}, "not a size"},
		{"empty", "", memory{}, "missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatus([]byte(tt.in))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parseStatus: %v, %v; want an error with %q", got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseStatus: %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func FuzzParseStatus(f *testing.F) {
	f.Add([]byte(status))
	f.Add([]byte("VmRSS: 1 kB\nRssAnon: 2 kB\nVmRSS: 3 kB\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseStatus(data)
		if err == nil && (m.RSS < 0 || m.Anon < 0) {
			t.Fatalf("accepted %q as %+v", data, m)
		}
	})
}

func TestStats(t *testing.T) {
	ds := []time.Duration{30, 10, 20, 40}
	if got := median(ds); got != 25 {
		t.Errorf("median %v, want 25", got)
	}
	if got := median(ds[:3]); got != 20 {
		t.Errorf("median of three %v, want 20", got)
	}
	if maxOf(ds) != 40 || minOf(ds) != 10 || median(nil) != -1 || maxOf(nil) != -1 {
		t.Errorf("max %v min %v, empty %v %v", maxOf(ds), minOf(ds), median(nil), maxOf(nil))
	}
	if !math.IsNaN(medianFloat(nil)) {
		t.Error("the median of nothing is a number")
	}
	for _, c := range []struct {
		a, b float64
		want string
	}{{3, 2, "1.50x"}, {1, 0, "n/a"}, {math.NaN(), 1, "n/a"}} {
		if got := ratio(c.a, c.b); got != c.want {
			t.Errorf("ratio(%v, %v) = %q, want %q", c.a, c.b, got, c.want)
		}
	}
	if got := num(-0.001, 2); got != "0.00" {
		t.Errorf("num(-0.001, 2) = %q", got)
	}
	if got := num(-1.5, 1); got != "-1.5" {
		t.Errorf("num(-1.5, 1) = %q", got)
	}
	if got := ms(-1); got != "n/a" {
		t.Errorf("ms(-1) = %q", got)
	}
}

func TestRoundRange(t *testing.T) {
	iops := func(r fioResult) float64 { return r.IOPS }
	a := []fioResult{{IOPS: 10}, {IOPS: 30}, {IOPS: 20}}
	b := []fioResult{{IOPS: 20}, {IOPS: 20}, {IOPS: 20}}
	if got := roundRange(a, b, iops); got != " (0.50–1.50)" {
		t.Errorf("roundRange %q", got)
	}
	if got := roundRange(a[:1], b[:1], iops); got != "" {
		t.Errorf("roundRange of one round %q", got)
	}
	if got := goal("g", 4, []string{"x", "y"}); got != "goal g: NOT met in 2 of 4 jobs (x; y)" {
		t.Errorf("goal %q", got)
	}
	if got := goal("g", 4, nil); got != "goal g: met in all 4 jobs" {
		t.Errorf("goal %q", got)
	}
}

func TestTable(t *testing.T) {
	tb := table{title: "T", header: []string{"job", "a", "a/b"}, rows: [][]string{{"long label", "1", "0.50x"}, {"x", "12345", "n/a"}},
		notes: []string{"goal: met"}}
	want := "T\n" +
		"job             a    a/b\n" +
		"long label      1  0.50x\n" +
		"x           12345    n/a\n" +
		"  goal: met\n"
	if got := tb.String(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
}

func TestFlags(t *testing.T) {
	tests := []struct {
		args []string
		err  string
	}{
		{nil, ""},
		{[]string{"--sections", "fio,rss", "--snap-sizes", "1,2", "--driver-flag=--nbd-connections=1"}, ""},
		{[]string{"--sections", "fio,nope"}, "unknown"},
		{[]string{"--snap-sizes", "100,2G"}, "whole number"},
		{[]string{"--snap-sizes", "0"}, "whole number"},
		{[]string{"--fio-rounds", "0"}, "fio"},
		{[]string{"--rss-volumes", "0"}, "rss"},
		{[]string{"--driver-flag", "v"}, "not a flag"},
		{[]string{"extra"}, "unexpected"},
	}
	for _, tt := range tests {
		c, err := parseFlags(tt.args)
		if tt.err == "" {
			if err != nil {
				t.Errorf("%q: %v", tt.args, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("%q: %v (%+v), want an error with %q", tt.args, err, c, tt.err)
		}
	}
}

const stat = "173 (ploop-csi) S 1 173 173 0 -1 4194560 2990 0 0 0 250 37 0 0 20 0 9 0 1234 1262424 6155 18446744073709551615"

func TestParseStat(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want time.Duration
		err  string
	}{
		{"stat", stat, 2870 * time.Millisecond, ""},
		{"odd name", strings.Replace(stat, "(ploop-csi)", "(a) b (c))", 1), 2870 * time.Millisecond, ""},
		{"short", "1 (x) S 1 2 3", 0, "fields"},
		{"no name", "1 x S", 0, "no command name"},
		{"bad time", strings.Replace(stat, " 250 ", " -5 ", 1), 0, "bad time"},
		{"huge", strings.Replace(stat, " 250 ", " 9223372036854775807 ", 1), 0, "out of range"},
		{"too big", strings.Replace(stat, " 250 ", " 9223372036854775808 ", 1), 0, "bad time"},
		{"overflow", strings.Replace(stat, " 250 ", " 922337203685477580 ", 1), 0, "out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStat([]byte(tt.in))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parseStat: %v, %v; want an error with %q", got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseStat: %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(stat))
	f.Add([]byte("1 ()) S"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if d, err := parseStat(data); err == nil && d < 0 {
			t.Fatalf("accepted %q as %v", data, d)
		}
	})
}

const driverLog = `I1202 05:30:08.598540     173 online.go:37] "serving: snapshot" dir="/r/v1" guid="{g}" pause="23.7331ms" err=null
I1202 05:30:08.604681     173 online.go:179] "online snapshot" logger="attachments" volume="ploop-1" guid="{g}" pause="23.7331ms" err=null
I1202 05:30:09.604681     173 online.go:179] "online snapshot" logger="attachments" volume="ploop-2" guid="{g}" pause="2ms" err=null
I1202 05:31:42.604651     173 online.go:198] "online snapshot delete" logger="attachments" volume="ploop-1" guid="{g}" pause="9.91424ms" err=null
I1202 05:31:47.103303     173 online.go:179] "online snapshot" logger="attachments" volume="ploop-1" guid="{g}" pause="3.0097ms" err=null
I1202 05:31:48.103303     173 online.go:179] "online snapshot" logger="attachments" volume="ploop-1" guid="{g}" pause="bad" err="x"
`

func TestParsePauses(t *testing.T) {
	got := parsePauses([]byte(driverLog))
	want := map[string][]time.Duration{
		"ploop-1": {23733100 * time.Nanosecond, 3009700 * time.Nanosecond},
		"ploop-2": {2 * time.Millisecond},
	}
	if len(got) != len(want) {
		t.Fatalf("parsePauses: %v, want %v", got, want)
	}
	for k, w := range want {
		if g := got[k]; len(g) != len(w) || (len(g) > 0 && (g[0] != w[0] || g[len(g)-1] != w[len(w)-1])) {
			t.Errorf("%s: %v, want %v", k, g, w)
		}
	}
	if len(parsePauses(nil)) != 0 {
		t.Error("pauses in an empty log")
	}
}

func FuzzParsePauses(f *testing.F) {
	f.Add([]byte(driverLog))
	f.Fuzz(func(t *testing.T, data []byte) {
		for id, ps := range parsePauses(data) {
			for _, p := range ps {
				if p < 0 || id == "" {
					t.Fatalf("%q: pause %v of %q", data, p, id)
				}
			}
		}
	})
}
