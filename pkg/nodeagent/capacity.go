package nodeagent

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// DefaultCapacityInterval is how often the capacity is published when no
// operation changed it meanwhile.
const DefaultCapacityInterval = time.Minute

// capacityPublisher keeps the Node's capacity annotations
// (v1alpha1.CapacityAnnotation) current: at
// start, after every operation that changes what the root holds, and
// every interval for what changes on the root behind the catalogue's
// back (data written into thin volumes).
type capacityPublisher struct {
	c        client.Client
	node     string
	cat      Catalog
	interval time.Duration
	kick     chan struct{}
}

// changed asks for a publication soon; it never blocks.
func (p *capacityPublisher) changed() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Start publishes until ctx ends (a manager.Runnable).
func (p *capacityPublisher) Start(ctx context.Context) error {
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		if err := p.publish(ctx); err != nil && ctx.Err() == nil {
			// The next tick or operation retries; the controller keeps the
			// last published value meanwhile.
			logFrom(ctx).Error(err, "publish the storage root's capacity")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-p.kick:
		}
	}
}

// NeedLeaderElection: every node publishes its own.
func (p *capacityPublisher) NeedLeaderElection() bool { return false }

func (p *capacityPublisher) publish(ctx context.Context) error {
	ann := map[string]string{}
	for _, typ := range []catalog.Type{catalog.Ploop, catalog.Simfs} {
		c, err := p.cat.Capacity(ctx, typ)
		if err != nil {
			return fmt.Errorf("capacity for %s: %w", typ, err)
		}
		ann[v1alpha1.CapacityAnnotation+string(typ)] = strconv.FormatInt(c.AvailableBytes, 10)
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return err
	}
	node := &corev1.Node{}
	node.Name = p.node
	if err := p.c.Patch(ctx, node, client.RawPatch(types.MergePatchType, patch)); err != nil {
		return fmt.Errorf("annotate node %s: %w", p.node, err)
	}
	return nil
}
