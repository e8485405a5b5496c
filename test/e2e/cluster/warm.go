package cluster

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/test/e2e/gomod"
	"github.com/ploop-csi/ploop-csi/test/e2e/helmbin"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// Warm builds or downloads into the cache everything the cluster's run
// needs from the network (the Kubernetes binaries, the sidecars and the
// snapshot-controller, the snapshot CRDs, helm, the VM's kernel), so that
// the run itself needs none.
func Warm(ctx context.Context, logf func(string, ...any)) error {
	if err := vmtest.Prepare(ctx, logf); err != nil {
		return err
	}
	for _, cmd := range kubeapi.Commands {
		if _, err := kubeapi.Binary(ctx, cmd, logf); err != nil {
			return err
		}
	}
	for _, s := range append(Sidecars, SnapshotController) {
		if _, err := s.Binary(ctx, logf); err != nil {
			return err
		}
	}
	if _, err := gomod.Dir(ctx, snapshotCRDModule); err != nil {
		return err
	}
	_, err := helmbin.Path(ctx, helmbin.V3, logf)
	return err
}

// linkUp sets the interface up (a new network namespace's lo is down).
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	return nil
}
