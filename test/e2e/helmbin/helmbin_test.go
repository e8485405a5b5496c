package helmbin

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/mod/semver"
)

// TestPath builds (or finds) each helm and runs it: the executable in the
// cache is the release asked for.
func TestPath(t *testing.T) {
	for _, v := range []string{V3, V4} {
		t.Run(v, func(t *testing.T) {
			p, err := Path(context.Background(), v, t.Logf)
			if err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(p, "version", "--template", "{{.Version}}").CombinedOutput()
			if err != nil {
				t.Fatalf("%s version: %v\n%s", p, err, out)
			}
			// Built without the release's ldflags, helm knows its
			// major.minor (from its source), not the patch.
			if got := strings.TrimSpace(string(out)); !strings.HasPrefix(got, semver.MajorMinor(v)) {
				t.Errorf("%s reports version %q, want %s", p, got, semver.MajorMinor(v))
			}
		})
	}
}

func TestPathRefusesNonReleases(t *testing.T) {
	for _, v := range []string{"", "3.22.0", "v3.22", "v3.22.0-rc.1", "latest"} {
		if _, err := Path(context.Background(), v, nil); err == nil {
			t.Errorf("Path(%q) succeeded, want an error", v)
		}
	}
}

// TestMakefileHelm: deploy/ is rendered by the Makefile's helm, which must
// be the Helm 3 the chart tests prove.
func TestMakefileHelm(t *testing.T) {
	b, err := os.ReadFile("../../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^HELM_VERSION\s*:=\s*(\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the Makefile sets no HELM_VERSION")
	}
	if got := string(m[1]); got != V3 {
		t.Errorf("Makefile HELM_VERSION is %s, helmbin.V3 is %s: keep them equal", got, V3)
	}
}
