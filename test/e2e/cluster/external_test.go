package cluster

import (
	"bufio"
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// testDriverFile declares the driver to the suite; it names its
// StorageClass file relative to the repository's root.
const testDriverFile = "test/e2e/cluster/testdata/test-driver.yaml"

// externalSpecs picks the specs make test runs (issue 13: provisioning,
// snapshot, expansion, volume mode, subpath), each once, so that they fit
// the CI budget under emulation: the start of each one's name after the
// driver. make e2e-full (PLOOP_CSI_E2E_FULL=1) runs every spec of the
// driver that is not disruptive or serial.
var externalSpecs = []string{
	"[Testpattern: Dynamic PV (default fs)] provisioning should provision storage with pvc data source",
	"[Testpattern: Dynamic PV (block volmode)] provisioning should provision storage with snapshot data source [Feature:VolumeSnapshotDataSource]",
	"[Testpattern: Dynamic Snapshot (delete policy)] snapshottable [Feature:VolumeSnapshotDataSource] volume snapshot controller",
	"[Testpattern: Dynamic PV (default fs)(allowExpansion)] volume-expand should resize volume when PVC is edited while pod is using it",
	"[Testpattern: Dynamic PV (block volmode)(allowExpansion)] volume-expand should resize volume when PVC is edited while pod is using it",
	"[Testpattern: Dynamic PV (block volmode)] volumeMode should not mount / map unused volumes in a pod",
	"[Testpattern: Dynamic PV (default fs)] subPath should support existing directory",
	// And one each of what else the driver claims.
	"[Testpattern: Dynamic PV (ext4)] volumes should store data",
	"[Testpattern: Dynamic PV (default fs)] fsgroupchangepolicy (OnRootMismatch)[LinuxOnly], pod created with an initial fsgroup, new pod fsgroup applied to volume contents",
	"[Testpattern: Dynamic PV (delayed binding)] topology should provision a volume and schedule a pod with AllowedTopologies",
	"[Testpattern: Dynamic PV (default fs)] capacity provides storage capacity information",
	"[Testpattern: Generic Ephemeral-volume (default fs) (late-binding)] ephemeral should create read/write inline ephemeral volume",
}

const externalFullEnv = "PLOOP_CSI_E2E_FULL"

// externalFocus is the ginkgo focus and skip of this run.
func externalFocus() (focus, skip string) {
	driver := `External.Storage \[Driver: csi.ploop.io\] `
	if os.Getenv(externalFullEnv) != "" {
		return driver, `\[Disruptive\]|\[Serial\]`
	}
	alt := make([]string, len(externalSpecs))
	for i, s := range externalSpecs {
		alt[i] = regexp.QuoteMeta(s)
	}
	// Slow specs share their start with the picked ones (… in parallel
	// [Slow]), and so do the ROX variants of the provisioning ones.
	return driver + `(` + strings.Join(alt, "|") + `)`, `\[Disruptive\]|\[Serial\]|\[Slow\]|ROX`
}

// testExternal runs the Kubernetes external storage suite, e2e.test of
// the cluster's release, against the driver, and lists the specs that
// ran, passed, failed and were skipped (with the suite's reason).
func testExternal(t *testing.T, c *Cluster) {
	timeout := 30 * time.Minute
	if os.Getenv(externalFullEnv) != "" {
		timeout = 6 * time.Hour
	}
	// Leave the flows after this one (cleanup) time to run.
	if d, ok := t.Deadline(); ok && time.Until(d)-5*time.Minute < timeout {
		timeout = time.Until(d) - 5*time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	e2e, err := kubeapi.Binary(ctx, kubeapi.E2ETest, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	kubectl, err := kubeapi.Binary(ctx, "kubectl", t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	repos := filepath.Join(dir, "repo-list.yaml")
	report := filepath.Join(dir, "report")
	if err := os.WriteFile(repos, []byte(e2eRepoList), 0o644); err != nil {
		t.Fatal(err)
	}
	focus, skip := externalFocus()
	kc := filepath.Join(c.API.Dir(), "admin.kubeconfig")
	cmd := exec.CommandContext(ctx, e2e, "-kubeconfig="+kc, "-provider=skeleton", "-kubectl-path="+kubectl,
		"-storage.testdriver="+filepath.Join(root, testDriverFile), "-repo-root="+root, "-report-dir="+report,
		"-ginkgo.focus="+focus, "-ginkgo.skip="+skip, "-ginkgo.no-color", "-ginkgo.v", "-ginkgo.timeout="+(timeout-time.Minute).String(),
		// The node runs the driver's pods and nothing the suite would
		// wait for in kube-system.
		"-minStartupPods=0", "-allowed-not-ready-nodes=0")
	cmd.Env = append(os.Environ(), "KUBE_TEST_REPO_LIST="+repos, "KUBECONFIG="+kc)
	cmd.Dir = dir
	logPath := filepath.Join(dir, "e2e.log")
	log, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	t.Logf("external suite: focus %s", focus)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The whole log goes to a file (it is long); the test's log shows the
	// suite's verdict lines as they come, to follow a long run.
	sc2 := bufio.NewScanner(out)
	sc2.Buffer(nil, 1<<20)
	// A spec's verdict (• [12.3 seconds]) comes on the line before its name.
	verdict := ""
	for sc2.Scan() {
		line := sc2.Text()
		fmt.Fprintln(log, line)
		switch {
		case verdict != "":
			t.Logf("external suite: %s %s", verdict, strings.TrimSpace(line))
			verdict = ""
		case verdictLine.MatchString(line) && strings.HasSuffix(line, "seconds]"):
			verdict = strings.TrimSpace(line)
		case verdictLine.MatchString(line):
			t.Logf("external suite: %s", strings.TrimSpace(line))
		}
	}
	runErr := cmd.Wait()
	t.Logf("external suite: ran in %s", time.Since(start).Round(time.Second))
	res, err := readJUnit(filepath.Join(report, "junit_01.xml"))
	if err != nil {
		t.Errorf("the suite's report: %v", err)
	}
	res.log(t)
	if runErr != nil || len(res.failed) > 0 || err != nil {
		b, _ := os.ReadFile(logPath)
		t.Errorf("e2e.test: %v; %d failed; end of its log:\n%s", runErr, len(res.failed), tail(string(b), 30000))
	}
	if len(res.passed) == 0 {
		t.Errorf("the external suite passed no spec of focus %s", focus)
	}
}

// verdictLine matches what the suite prints as a spec ends.
var verdictLine = regexp.MustCompile(`^\s*(•|S \[SKIPPED\]|\[FAILED\]|\[PANICKED\]|\[TIMEDOUT\]|Ran \d+ of|SUCCESS!|FAIL!)`)

// suiteResult is the suite's verdict per spec.
type suiteResult struct {
	passed, failed []string
	// skipped maps a spec that was picked by the focus but skipped at run
	// time (the driver lacks a capability the pattern needs, say) to the
	// suite's reason.
	skipped map[string]string
	// filtered counts the specs the focus left out.
	filtered int
}

func (r suiteResult) log(t *testing.T) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "external suite: %d passed, %d failed, %d skipped by the suite, %d not in focus\n",
		len(r.passed), len(r.failed), len(r.skipped), r.filtered)
	for _, s := range r.passed {
		fmt.Fprintf(&b, "  passed: %s\n", s)
	}
	for _, s := range r.failed {
		fmt.Fprintf(&b, "  FAILED: %s\n", s)
	}
	names := make([]string, 0, len(r.skipped))
	for s := range r.skipped {
		names = append(names, s)
	}
	sort.Strings(names)
	for _, s := range names {
		fmt.Fprintf(&b, "  skipped: %s: %s\n", s, r.skipped[s])
	}
	t.Log(b.String())
}

// junitSuites is what this needs of the suite's JUnit report.
type junitSuites struct {
	Suites []struct {
		Cases []struct {
			Name    string `xml:"name,attr"`
			Status  string `xml:"status,attr"`
			Skipped *struct {
				Message string `xml:"message,attr"`
			} `xml:"skipped"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

// readJUnit reads the suite's report. The suite lists every spec it has;
// those the focus left out are "skipped" with the message "skipped" and
// count as filtered.
func readJUnit(path string) (suiteResult, error) {
	res := suiteResult{skipped: map[string]string{}}
	data, err := os.ReadFile(path)
	if err != nil {
		return res, err
	}
	var js junitSuites
	if err := xml.Unmarshal(data, &js); err != nil {
		return res, fmt.Errorf("%s: %w", path, err)
	}
	for _, s := range js.Suites {
		for _, c := range s.Cases {
			name, spec := strings.CutPrefix(c.Name, "[It] ")
			switch c.Status {
			case "passed":
				// The suite's set-up and reports are entries too.
				if spec {
					res.passed = append(res.passed, name)
				}
			case "skipped", "pending":
				msg := ""
				if c.Skipped != nil {
					msg = strings.TrimSpace(strings.TrimPrefix(c.Skipped.Message, "skipped - "))
				}
				if msg == "" || msg == "skipped" {
					res.filtered++
				} else {
					res.skipped[name] = msg
				}
			default: // failed, panicked, interrupted, aborted, timedout
				res.failed = append(res.failed, name+" ("+c.Status+")")
			}
		}
	}
	sort.Strings(res.passed)
	sort.Strings(res.failed)
	return res, nil
}

// TestReadJUnit checks the reading of the suite's report on the shapes
// its writer (ginkgo's JUnit reporter as the e2e framework configures it)
// produces.
func TestReadJUnit(t *testing.T) {
	const report = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="5" disabled="3" errors="0" failures="1" time="10">
  <testsuite name="Kubernetes e2e suite" package="/" tests="5" disabled="3" skipped="0" errors="0" failures="1" time="10">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1"></testcase>
    <testcase name="[It] External Storage [Driver: csi.ploop.io] a" classname="Kubernetes e2e suite" status="passed" time="3"></testcase>
    <testcase name="[It] External Storage [Driver: csi.ploop.io] b" classname="Kubernetes e2e suite" status="failed" time="3"><failure type="failed">boom</failure></testcase>
    <testcase name="[It] External Storage [Driver: csi.ploop.io] c" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped - Driver csi.ploop.io doesn't support ntfs -- skipping"></skipped></testcase>
    <testcase name="[It] something else" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped"></skipped></testcase>
    <testcase name="[SynchronizedAfterSuite]" classname="Kubernetes e2e suite" status="timedout" time="0"></testcase>
  </testsuite>
</testsuites>`
	tests := []struct {
		name    string
		data    string
		wantErr bool
		passed  []string
		failed  []string
		skipped map[string]string
		filter  int
	}{
		{name: "report", data: report,
			passed:  []string{"External Storage [Driver: csi.ploop.io] a"},
			failed:  []string{"External Storage [Driver: csi.ploop.io] b (failed)", "[SynchronizedAfterSuite] (timedout)"},
			skipped: map[string]string{"External Storage [Driver: csi.ploop.io] c": "Driver csi.ploop.io doesn't support ntfs -- skipping"},
			filter:  1},
		{name: "not xml", data: "no report", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "junit_01.xml")
			if err := os.WriteFile(path, []byte(tt.data), 0o644); err != nil {
				t.Fatal(err)
			}
			res, err := readJUnit(path)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error %t", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if fmt.Sprint(res.passed) != fmt.Sprint(tt.passed) || fmt.Sprint(res.failed) != fmt.Sprint(tt.failed) ||
				fmt.Sprint(res.skipped) != fmt.Sprint(tt.skipped) || res.filtered != tt.filter {
				t.Errorf("got %+v, want passed %v failed %v skipped %v filtered %d", res, tt.passed, tt.failed, tt.skipped, tt.filter)
			}
		})
	}
	if _, err := readJUnit(filepath.Join(t.TempDir(), "missing.xml")); err == nil {
		t.Error("a missing report read without error")
	}
}
