package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/ploop-csi/ploop-csi/pkg/serving"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
	"github.com/ploop-csi/ploop-csi/test/e2e/driverproc"
)

// bench is one run: a work directory, a storage root on a sparse ext4
// file system of its own (so that images, raw files and parallels images
// all sit on the same file system) and the driver over it.
type bench struct {
	cfg  config
	out  io.Writer
	work string
	disk string // mount point of the scratch file system
	root string // the driver's storage root, below disk
	cmp  string // the comparison devices' files, below disk

	driver    *driverproc.Proc
	driverLog *os.File

	volumes map[string]*volume // by volume id, until deleted
	cleanup []func(context.Context) error
}

// rootGiB is the scratch file system's size. It is sparse, so it takes only
// what is written: at most the snapshot measurement's twice 2 GiB.
const rootGiB = 64

const nodeID = "bench-node"

func run(ctx context.Context, cfg config, out io.Writer) (err error) {
	for _, tool := range []string{"fio", "qemu-img", "qemu-nbd", "losetup", "mkfs.ext4", "fstrim"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is required: %w", tool, err)
		}
	}
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		return fmt.Errorf("this kernel has no nbd driver loaded (run in the test VM: test/bench/bench-driver.sh): %w", err)
	}
	drv, err := filepath.Abs(cfg.driver)
	if err != nil {
		return err
	}
	cfg.driver = drv
	work, err := os.MkdirTemp(cfg.tmpDir, "benchdriver-")
	if err != nil {
		return err
	}
	b := &bench{cfg: cfg, out: out, work: work, volumes: map[string]*volume{}}
	defer func() {
		// The caller's context may be what ended the run.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
		defer cancel()
		if cerr := b.teardown(cctx); cerr != nil {
			err = errors.Join(err, cerr)
			fmt.Fprintf(out, "left %s for inspection\n", work)
			return
		}
		if err != nil {
			b.showDriverLog()
		}
		os.RemoveAll(work)
	}()
	start := time.Now()
	if err := b.setUp(ctx); err != nil {
		return fmt.Errorf("set up: %w", err)
	}
	var tables []string
	for _, s := range []struct {
		name string
		run  func(context.Context) (string, error)
	}{{"fio", b.benchFio}, {"snapshot", b.benchSnapshot}, {"rss", b.benchRSS}} {
		if !cfg.sections[s.name] {
			continue
		}
		t0 := time.Now()
		b.logf("== %s", s.name)
		table, err := s.run(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
		b.logf("%s done in %v", s.name, time.Since(t0).Round(time.Second))
		tables = append(tables, table)
	}
	fmt.Fprintf(out, "\n%s\n", strings.Join(tables, "\n"))
	fmt.Fprintf(out, "benchdriver: measured in %v\n", time.Since(start).Round(time.Second))
	return nil
}

// logf prints a progress line.
func (b *bench) logf(format string, a ...any) {
	fmt.Fprintf(b.out, "benchdriver: "+format+"\n", a...)
}

// sh runs a command and returns its stdout; its stderr goes into the error.
func sh(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// setUp makes the scratch file system and starts the driver.
func (b *bench) setUp(ctx context.Context) error {
	img := filepath.Join(b.work, "disk.img")
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	err = f.Truncate(rootGiB << 30)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	// The sparse file reads as zeroes: nothing to zero, now or lazily in
	// the background while fio runs. Project quota only so that the
	// driver's simfs side opens without complaint.
	if _, err := sh(ctx, "mkfs.ext4", "-q", "-O", "quota,project", "-E", "assume_storage_prezeroed=1,nodiscard", img); err != nil {
		return err
	}
	b.disk = filepath.Join(b.work, "disk")
	if err := os.Mkdir(b.disk, 0o755); err != nil {
		return err
	}
	if _, err := sh(ctx, "mount", "-o", "loop,prjquota", img, b.disk); err != nil {
		return err
	}
	b.cleanup = append(b.cleanup, func(ctx context.Context) error {
		_, err := sh(ctx, "umount", b.disk)
		return err
	})
	b.root, b.cmp = filepath.Join(b.disk, "root"), filepath.Join(b.disk, "cmp")
	for _, d := range []string{b.root, b.cmp} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return err
		}
	}
	logPath := b.cfg.driverLog
	if logPath == "" {
		logPath = filepath.Join(b.work, "ploop-csi.log")
	}
	b.driverLog, err = os.Create(logPath)
	if err != nil {
		return err
	}
	return b.startDriver(ctx)
}

// startDriver runs ploop-csi with its defaults, except what the bench
// needs: thin volumes far beyond the scratch root (16 TiB), and staging
// paths in the work directory.
func (b *bench) startDriver(ctx context.Context) error {
	p, err := driverproc.Start(ctx, driverproc.Config{
		Binary: b.cfg.driver, Socket: filepath.Join(b.work, "csi.sock"), Output: b.driverLog,
		Args: append([]string{"--mode", "all", "--nodeid", nodeID, "--storage-root", b.root, "--kubelet-dir", b.work,
			"--overcommit-ratio", "1000", "--v", "2"}, b.cfg.driverFlags...),
	})
	if err != nil {
		return err
	}
	b.driver = p
	return nil
}

// stopDriver stops the driver with SIGTERM; it must exit cleanly.
func (b *bench) stopDriver() error {
	if b.driver == nil {
		return nil
	}
	p := b.driver
	b.driver = nil
	return p.Stop(time.Minute)
}

// teardown undoes everything, in reverse: volumes through the driver
// first, then the devices and mounts.
func (b *bench) teardown(ctx context.Context) error {
	var errs []error
	if b.driver != nil {
		for _, v := range b.volumes {
			if err := b.deleteVolume(ctx, v); err != nil {
				errs = append(errs, err)
			}
		}
		if err := b.stopDriver(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := b.unwind(ctx, 0); err != nil {
		errs = append(errs, err)
	}
	if b.driverLog != nil {
		b.driverLog.Close()
	}
	return errors.Join(errs...)
}

// unwind runs, last first, the cleanups registered since there were mark
// of them, and forgets them.
func (b *bench) unwind(ctx context.Context, mark int) error {
	var errs []error
	for i := len(b.cleanup) - 1; i >= mark; i-- {
		if err := b.cleanup[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	b.cleanup = b.cleanup[:mark]
	return errors.Join(errs...)
}

// showDriverLog prints the end of the driver's log after a failure.
func (b *bench) showDriverLog() {
	if b.driverLog == nil {
		return
	}
	data, err := os.ReadFile(b.driverLog.Name())
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 60 {
		lines = lines[len(lines)-60:]
	}
	fmt.Fprintf(b.out, "the end of ploop-csi's log:\n%s\n", strings.Join(lines, "\n"))
}

// trimRoot returns the space of deleted files to the tmpfs the scratch
// file system lives on, between measurements.
func (b *bench) trimRoot(ctx context.Context) error {
	_, err := sh(ctx, "fstrim", b.disk)
	return err
}

// volume is a ploop volume of the driver, staged in Block mode.
type volume struct {
	id      string
	name    string
	context map[string]string
	staging string // set while staged
	target  string // set while published
	dev     string // /dev/nbdN while staged
}

var blockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// createVolume creates a ploop Block volume; attach, when set, is the
// StorageClass's transport (nbd, ublk).
func (b *bench) createVolume(ctx context.Context, name string, size int64, attach string) (*volume, error) {
	params := map[string]string{"type": "ploop"}
	if attach != "" {
		params["attach"] = attach
	}
	resp, err := b.driver.Controller.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: name, Parameters: params,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap},
	})
	if err != nil {
		return nil, fmt.Errorf("CreateVolume %s: %w", name, err)
	}
	v := &volume{id: resp.GetVolume().GetVolumeId(), name: name, context: resp.GetVolume().GetVolumeContext()}
	b.volumes[v.id] = v
	return v, nil
}

// stage stages v as a raw block device and, when publish is set,
// publishes it the way a pod gets it (the device node bind-mounted on a
// file).
func (b *bench) stage(ctx context.Context, v *volume, publish bool) error {
	staging := filepath.Join(b.work, "staging", v.name)
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return err
	}
	if _, err := b.driver.Node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: staging,
		VolumeCapability: blockCap, VolumeContext: v.context}); err != nil {
		return fmt.Errorf("NodeStageVolume %s: %w", v.name, err)
	}
	v.staging = staging
	dev, err := deviceOf(v.id)
	if err != nil {
		return err
	}
	v.dev = dev
	if !publish {
		return nil
	}
	target := filepath.Join(b.work, "pods", v.name)
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return err
	}
	if _, err := b.driver.Node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: blockCap, VolumeContext: v.context}); err != nil {
		return fmt.Errorf("NodePublishVolume %s: %w", v.name, err)
	}
	v.target = target
	return nil
}

// unstage unpublishes and unstages v, as far as it is.
func (b *bench) unstage(ctx context.Context, v *volume) error {
	if v.target != "" {
		if _, err := b.driver.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
			return fmt.Errorf("NodeUnpublishVolume %s: %w", v.name, err)
		}
		v.target = ""
	}
	if v.staging != "" {
		if _, err := b.driver.Node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			return fmt.Errorf("NodeUnstageVolume %s: %w", v.name, err)
		}
		v.staging, v.dev = "", ""
	}
	return nil
}

// deleteVolume unstages and deletes v.
func (b *bench) deleteVolume(ctx context.Context, v *volume) error {
	if err := b.unstage(ctx, v); err != nil {
		return err
	}
	if _, err := b.driver.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
		return fmt.Errorf("DeleteVolume %s: %w", v.name, err)
	}
	delete(b.volumes, v.id)
	return nil
}

// deviceOf finds the kernel device that serves volume id: the nbd device
// whose backend attribute names the volume, or the ublk device that
// carries its tag.
func deviceOf(id string) (string, error) {
	backends, err := filepath.Glob("/sys/block/nbd*/backend")
	if err != nil {
		return "", err
	}
	for _, p := range backends {
		if data, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(data)) == id {
			return "/dev/" + filepath.Base(filepath.Dir(p)), nil
		}
	}
	if ctrl, err := ublk.OpenControl(); err == nil {
		defer ctrl.Close()
		if info, ok, err := serving.FindUblk(ctrl, id); err == nil && ok {
			return fmt.Sprintf("/dev/ublkb%d", info.ID), nil
		}
	}
	return "", fmt.Errorf("no nbd or ublk device serves %s", id)
}
