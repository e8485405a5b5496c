// Command kubebin prints the paths of the binaries the end-to-end cluster
// runs, building into the cache those it lacks: the Kubernetes commands of
// the release (kubeapi.Commands) and the CSI sidecars (cluster.Sidecars).
// It warms the cache before a test run and times each build.
//
//	go run ./test/e2e/cmd/kubebin [name...]
package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/cluster"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

func main() {
	want := os.Args[1:]
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	ctx := context.Background()
	build := func(name string, get func() (string, error)) {
		if len(want) > 0 && !slices.Contains(want, name) {
			return
		}
		start := time.Now()
		p, err := get()
		if err != nil {
			fmt.Fprintf(os.Stderr, "kubebin: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("%s\t%s\t%s\n", name, p, time.Since(start).Round(time.Millisecond))
	}
	for _, c := range kubeapi.Commands {
		build(c, func() (string, error) { return kubeapi.Binary(ctx, c, logf) })
	}
	for _, s := range append(cluster.Sidecars, cluster.SnapshotController) {
		build(s.Name, func() (string, error) { return s.Binary(ctx, logf) })
	}
}
