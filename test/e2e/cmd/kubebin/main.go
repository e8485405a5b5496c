// Command kubebin prints the paths of the Kubernetes binaries the end-to-end
// tests run (kubeapi.Commands), building into the cache those it lacks:
// warming the cache before a test run, and timing each build.
//
//	go run ./test/e2e/cmd/kubebin [command...]
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

func main() {
	cmds := os.Args[1:]
	if len(cmds) == 0 {
		cmds = kubeapi.Commands
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	for _, c := range cmds {
		start := time.Now()
		p, err := kubeapi.Binary(context.Background(), c, logf)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kubebin: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("%s\t%s\t%s\n", c, p, time.Since(start).Round(time.Millisecond))
	}
}
