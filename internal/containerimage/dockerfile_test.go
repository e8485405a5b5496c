package containerimage

import (
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestDockerfileMatches keeps the Dockerfile and the daemonless build in
// step: what one changes, the other must too.
func TestDockerfileMatches(t *testing.T) {
	data, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	// One instruction per line, continuations joined, comments dropped.
	var lines []string
	for _, l := range strings.Split(strings.ReplaceAll(string(data), "\\\n", " "), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, strings.Join(strings.Fields(l), " "))
		}
	}
	gomod, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	goLine := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod)
	if goLine == nil {
		t.Fatal("no go line in go.mod")
	}

	var labels []string
	for k, v := range Labels("${VERSION}", "${REVISION}") {
		labels = append(labels, k+"="+strconv.Quote(v))
	}
	slices.Sort(labels)
	var runtimePkgs []string
	for _, p := range RuntimePackages {
		if !slices.Contains(Essential, p) {
			runtimePkgs = append(runtimePkgs, p)
		}
	}
	uid := strconv.Itoa(UID)

	tests := []struct {
		what string
		ok   func(l string) bool
	}{
		{"ARG GO_VERSION=" + string(goLine[1]), func(l string) bool { return l == "ARG GO_VERSION="+string(goLine[1]) }},
		{"a static, trimmed build with the version", func(l string) bool {
			return strings.Contains(l, "CGO_ENABLED=0 go build -trimpath -ldflags "+strconv.Quote(ldflags("${VERSION}"))) &&
				strings.HasSuffix(l, "./cmd/ploop-csi ./cmd/ploopctl")
		}},
		{"FROM debian:bookworm-slim", func(l string) bool { return l == "FROM debian:bookworm-slim" }},
		{"apt-get install of " + strings.Join(runtimePkgs, " "), func(l string) bool {
			return strings.Contains(l, "apt-get install -y --no-install-recommends "+strings.Join(runtimePkgs, " ")+" &&") &&
				strings.Contains(l, "rm -rf /var/lib/apt/lists/*")
		}},
		{"the user " + UserName + " " + uid, func(l string) bool {
			return strings.Contains(l, "groupadd --gid "+uid+" "+UserName) && strings.Contains(l, "useradd --uid "+uid+" --gid "+uid) &&
				strings.Contains(l, "--shell /usr/sbin/nologin "+UserName)
		}},
		{"the binaries in /usr/bin", func(l string) bool { return l == "COPY --from=build /out/ploop-csi /out/ploopctl /usr/bin/" }},
		{"LABEL " + strings.Join(labels, " "), func(l string) bool {
			f, ok := strings.CutPrefix(l, "LABEL ")
			if !ok {
				return false
			}
			got := regexp.MustCompile(`[a-z.]+="[^"]*"`).FindAllString(f, -1)
			slices.Sort(got)
			return slices.Equal(got, labels)
		}},
		{"USER " + uid, func(l string) bool { return l == "USER "+uid }},
		{"ENTRYPOINT [\"" + Entrypoint + "\"]", func(l string) bool { return l == `ENTRYPOINT ["`+Entrypoint+`"]` }},
	}
	for _, tt := range tests {
		if !slices.ContainsFunc(lines, tt.ok) {
			t.Errorf("the Dockerfile has no instruction with %s", tt.what)
		}
	}
}
