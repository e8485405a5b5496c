package main

import (
	"context"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

// callServed sends an online operation to the process serving the stack
// in dir, if any (serving.ErrNotServed otherwise: the verb then runs
// offline). A merge of a large delta takes a while, hence the long bound.
func callServed(dir string, req serving.Request) (serving.Reply, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	return serving.Call(ctx, serving.ControlPath(dir), req)
}
