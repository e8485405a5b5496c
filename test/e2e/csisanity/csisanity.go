// Package csisanity runs the kubernetes-csi sanity suite
// (github.com/kubernetes-csi/csi-test/v5/pkg/sanity) against a ploop-csi
// endpoint, one parameter set per process, and checks its report.
//
// The suite is a Ginkgo suite, and Ginkgo runs one suite per process, so
// each parameter set runs in a child: the calling test binary re-executed
// with -test.run selecting a test that calls Child (every test binary that
// uses Run must have one, conventionally TestSanityChild). The child writes
// Ginkgo's JSON report, which Run reads back: Report.Check fails the test
// for any failed spec and for any skipped spec whose reason is not one of
// ExpectedSkips, the specs of capabilities the driver does not claim.
//
// pkg/driver runs it on the host against the real catalogue with its node
// faked; test/e2e/csisanity's VM test runs it against the real ploop-csi
// binary in mode all inside the test VM, for the five sets of Sets.
package csisanity

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2/types"
)

// Set is one parameter set of the suite.
type Set struct {
	Name string
	// AccessType is "mount" or "block".
	AccessType string
	// Params are the StorageClass parameters of the suite's volumes.
	Params map[string]string
	// RootFS is the filesystem of the storage root the set needs ("" when
	// any will do): simfs needs project quota, which the VM's ScratchFS
	// gives on ext4 and xfs.
	RootFS string
	// VolumeSize and ExpandSize: multiples of 1 MiB (ploop rounds to it,
	// and the suite compares the sizes exactly).
	VolumeSize, ExpandSize int64
}

const mib = int64(1) << 20

// Sets are the five parameter sets the driver is proved with. mkfs.xfs
// makes no filesystem below 300 MiB, so the xfs set's volumes are larger
// (they are thin: only what is written takes space).
func Sets() []Set {
	return []Set{
		{Name: "ploop-ext4", AccessType: "mount", Params: map[string]string{"type": "ploop", "csi.storage.k8s.io/fstype": "ext4"},
			RootFS: "ext4", VolumeSize: 64 * mib, ExpandSize: 96 * mib},
		{Name: "ploop-xfs", AccessType: "mount", Params: map[string]string{"type": "ploop", "csi.storage.k8s.io/fstype": "xfs"},
			RootFS: "ext4", VolumeSize: 320 * mib, ExpandSize: 384 * mib},
		{Name: "ploop-block", AccessType: "block", Params: map[string]string{"type": "ploop"},
			RootFS: "ext4", VolumeSize: 64 * mib, ExpandSize: 96 * mib},
		{Name: "simfs-ext4", AccessType: "mount", Params: map[string]string{"type": "simfs"},
			RootFS: "ext4", VolumeSize: 16 * mib, ExpandSize: 32 * mib},
		{Name: "simfs-xfs", AccessType: "mount", Params: map[string]string{"type": "simfs"},
			RootFS: "xfs", VolumeSize: 16 * mib, ExpandSize: 32 * mib},
	}
}

// UblkSet is the ploop-ext4 set with its volumes attached through ublk
// (the StorageClass parameter attach), for a kernel that has ublk.
func UblkSet() Set {
	s := Sets()[0]
	s.Name = "ploop-ext4-ublk"
	s.Params = map[string]string{"type": "ploop", "csi.storage.k8s.io/fstype": "ext4", "attach": "ublk"}
	return s
}

// ExpectedSkips are the reasons csi-sanity gives for skipping a spec that
// the driver may see, each for a capability it does not claim, with why.
func ExpectedSkips() map[string]string {
	const (
		noPublish = "PUBLISH_UNPUBLISH_VOLUME: volumes are node-local, there is no attach step between controller and node"
		noModify  = "MODIFY_VOLUME: no mutable parameters (VolumeAttributesClass)"
		noHealth  = "the CSI 1.13 VolumeHealth RPCs (alpha, no CO uses them yet); VOLUME_CONDITION is claimed instead"
	)
	return map[string]string{
		"ControllerPublishVolume not supported":                  noPublish,
		"ControllerUnpublishVolume not supported":                noPublish,
		"Controller Publish, UnpublishVolume not supported":      noPublish,
		"ControllerPublishVolume.readonly field not supported":   noPublish,
		"Modify volume not supported":                            noModify,
		"Modify Volume not supported":                            noModify,
		"ControllerModifyVolume not supported":                   noModify,
		"ControllerGetVolumeHealth not supported":                noHealth,
		"ControllerListVolumeHealth not supported":               noHealth,
		"NodeGetVolumeHealth not supported":                      noHealth,
		"NodeGetStorageHealth not supported":                     noHealth,
		"GroupControllerService not supported":                   "GroupController service: no volume group snapshots",
		"VolumeGroupSnapshots not supported":                     "GroupController service: no volume group snapshots",
		"SNAPSHOT_ACCESSIBILITY_CONSTRAINTS not supported":       "SNAPSHOT_ACCESSIBILITY_CONSTRAINTS: snapshots live where their volume does",
		"Config.IdempotentCount is zero or negative, skip tests": "never: IdempotentCount is set",
	}
}

// childEnv carries a child's configuration (JSON of childConfig).
const childEnv = "PLOOP_CSI_SANITY_CHILD"

type childConfig struct {
	Set     Set
	Address string
	WorkDir string
}

// Child runs the suite in this process when it is a child started by Run,
// and does nothing otherwise.
func Child(t *testing.T) {
	raw := os.Getenv(childEnv)
	if raw == "" {
		return
	}
	var c childConfig
	if err := json.Unmarshal([]byte(raw), &c); err != nil {
		t.Fatalf("csisanity: %s: %v", childEnv, err)
	}
	cfg := sanity.NewTestConfig()
	cfg.Address = c.Address
	cfg.TargetPath = filepath.Join(c.WorkDir, "target")
	cfg.StagingPath = filepath.Join(c.WorkDir, "staging")
	cfg.TestVolumeSize = c.Set.VolumeSize
	cfg.TestVolumeExpandSize = c.Set.ExpandSize
	cfg.TestVolumeParameters = c.Set.Params
	cfg.TestVolumeAccessType = c.Set.AccessType
	cfg.IdempotentCount = 5
	sanity.Test(t, cfg)
}

// InChild reports whether this process is a child started by Run.
func InChild() bool { return os.Getenv(childEnv) != "" }

// Report is what the suite did with one set.
type Report struct {
	Passed, Failed, Skipped, Pending int
	// Failures are "spec: message"; Skips map each skipped spec to its
	// reason.
	Failures []string
	Skips    map[string]string
}

// Run runs the suite for set against address (unix:///path) in a child
// process: this test binary, running the test childTest, which must call
// Child. workDir holds the suite's staging and target paths and the
// report. The child's output goes to the test log.
func Run(ctx context.Context, t *testing.T, childTest string, set Set, address, workDir string) Report {
	t.Helper()
	cfg, err := json.Marshal(childConfig{Set: set, Address: address, WorkDir: workDir})
	if err != nil {
		t.Fatal(err)
	}
	reportPath := filepath.Join(workDir, "sanity-report.json")
	timeout := 20 * time.Minute
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl) - 10*time.Second
	}
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run", "^"+regexp.QuoteMeta(childTest)+"$", "-test.v",
		"-test.timeout", timeout.String(), "-ginkgo.json-report", reportPath, "-ginkgo.no-color")
	cmd.Env = append(os.Environ(), childEnv+"="+string(cfg))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	runErr := cmd.Run()
	r, err := readReport(reportPath)
	if err != nil {
		t.Logf("csisanity %s output:\n%s", set.Name, out.String())
		t.Fatalf("csisanity %s: the suite left no report (%v; child: %v)", set.Name, err, runErr)
	}
	t.Logf("csi-sanity %s: %d passed, %d failed, %d skipped, %d pending in %v",
		set.Name, r.Passed, r.Failed, r.Skipped, r.Pending, time.Since(start).Round(time.Second))
	if r.Failed > 0 || testing.Verbose() {
		t.Logf("csisanity %s output:\n%s", set.Name, tail(out.String(), 400))
	}
	return r
}

// tail keeps the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d lines cut)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// readReport reads Ginkgo's JSON report.
func readReport(path string) (Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Report{}, err
	}
	var reports []types.Report
	if err := json.Unmarshal(b, &reports); err != nil {
		return Report{}, fmt.Errorf("decode %s: %w", path, err)
	}
	r := Report{Skips: map[string]string{}}
	for _, rep := range reports {
		for _, sr := range rep.SpecReports {
			if sr.LeafNodeType != types.NodeTypeIt {
				if sr.State.Is(types.SpecStateFailureStates) {
					r.Failed++
					r.Failures = append(r.Failures, fmt.Sprintf("%s: %s", sr.LeafNodeType, sr.Failure.Message))
				}
				continue
			}
			name := strings.Join(append(append([]string{}, sr.ContainerHierarchyTexts...), sr.LeafNodeText), " / ")
			switch {
			case sr.State == types.SpecStatePassed:
				r.Passed++
			case sr.State == types.SpecStateSkipped:
				r.Skipped++
				r.Skips[name] = sr.Failure.Message
			case sr.State == types.SpecStatePending:
				r.Pending++
			case sr.State.Is(types.SpecStateFailureStates):
				r.Failed++
				r.Failures = append(r.Failures, fmt.Sprintf("%s: %s", name, sr.Failure.Message))
			}
		}
	}
	sort.Strings(r.Failures)
	return r, nil
}

// Check fails t for every failed spec and every spec skipped for a reason
// that is not one of ExpectedSkips, and logs the skipped specs by reason.
func (r Report) Check(t *testing.T) {
	t.Helper()
	for _, f := range r.Failures {
		t.Errorf("csi-sanity failed: %s", f)
	}
	expected := ExpectedSkips()
	byReason := map[string][]string{}
	for spec, reason := range r.Skips {
		if _, ok := expected[reason]; !ok {
			t.Errorf("csi-sanity skipped %q: %q is not a capability the driver leaves unclaimed", spec, reason)
		}
		byReason[reason] = append(byReason[reason], spec)
	}
	reasons := make([]string, 0, len(byReason))
	for k := range byReason {
		reasons = append(reasons, k)
	}
	sort.Strings(reasons)
	for _, reason := range reasons {
		t.Logf("skipped %d spec(s): %s (%s)", len(byReason[reason]), reason, expected[reason])
	}
	if r.Passed == 0 {
		t.Error("csi-sanity passed no spec")
	}
}
