// Package demo is `make demo`: a tutorial that runs the real ploop-csi in
// mode all over a scratch storage root and drives a volume's life through
// the CSI gRPC API, printing each request, each answer and the commands
// that show what they did. Every step checks its outcome; Run fails at the
// first step that does not hold, after undoing what it can.
//
// It needs root and a kernel with nbd, loop and ext4 project quota (the
// test VM's; test/demo.sh decides where to run it). The storage root is a
// 1 GiB sparse ext4 file system with the quota and project features,
// mounted through a loop device with prjquota, so that simfs quotas hold whatever
// file system the work directory is on.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/ploop-csi/ploop-csi/test/e2e/driverproc"
)

// Config is what Run needs.
type Config struct {
	// Driver is the ploop-csi binary.
	Driver string
	// TempDir is where the demo makes its work directory; "" is
	// os.TempDir().
	TempDir string
	// Out receives the tutorial.
	Out io.Writer
	// DriverLog, when set, receives the driver's log; otherwise it goes to
	// a file in the work directory and its end is shown on failure.
	DriverLog io.Writer
}

// The demo's sizes: small, so that it runs in a minute or two under
// software emulation.
const (
	rootMiB     = 1024
	volumeMiB   = 128
	expandedMiB = 256
	simfsMiB    = 16
	dataMiB     = 8
	nodeID      = "demo-node"
	nobody      = 65534 // the unprivileged user of the quota step
)

// session is one run of the demo.
type session struct {
	cfg     Config
	out     io.Writer
	work    string // $W in the printed commands
	mounted bool   // the storage root's file system
	root    string // the storage root

	driver    *driverproc.Proc
	driverLog string // file, when Config.DriverLog is nil
	ident     csi.IdentityClient
	ctl       csi.ControllerClient
	node      csi.NodeClient

	vol    *csi.Volume     // step 1's volume, expanded in step 3
	nbdPre map[string]bool // nbd devices connected before the demo (not ours)

	// What exists, for the cleanup after a failure.
	volumes   []string
	snapshots []string
	staged    map[string]string // volume id → staging path
	published map[string]string // volume id → target path
}

// Run runs the demo. Its error names the step that failed; the work
// directory is removed in any case.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	drv, err := filepath.Abs(cfg.Driver)
	if err != nil {
		return err
	}
	if _, err := os.Stat(drv); err != nil {
		return fmt.Errorf("the driver binary: %w", err)
	}
	cfg.Driver = drv
	tmp := cfg.TempDir
	if tmp == "" {
		tmp = os.TempDir()
	}
	work, err := os.MkdirTemp(tmp, "csidemo-")
	if err != nil {
		return err
	}
	// The printed commands use $W unquoted.
	if !safePath.MatchString(work) {
		os.Remove(work)
		return fmt.Errorf("work directory %q: want a path of letters, digits and ./_- only (set TMPDIR)", work)
	}
	// The unprivileged writer of step 4 must reach the published volume.
	if err := os.Chmod(work, 0o755); err != nil {
		os.Remove(work)
		return err
	}
	s := &session{cfg: cfg, out: cfg.Out, work: work, staged: map[string]string{}, published: map[string]string{}}
	defer func() {
		if err != nil {
			s.printf("\nFAILED: %v\n", err)
			s.showDriverLog()
			s.printf("\n== Undoing what the demo made\n")
			// The caller's context may be what ended the demo.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
			defer cancel()
			s.undo(cctx)
		}
		if rerr := s.removeRoot(); rerr != nil {
			// Removing the work directory would empty the storage root.
			err = errors.Join(err, rerr, fmt.Errorf("left %s for inspection", work))
			return
		}
		if rerr := os.RemoveAll(work); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()

	s.printf("ploop-csi demo: a volume's life through the CSI gRPC API of the real driver.\n")
	s.printf("Legend:  > a CSI request   < its answer   $ a command and its output   # a note\n")
	steps := []struct {
		title string
		run   func(context.Context) error
	}{
		{"Set up: a storage root and the driver in mode all", s.setUp},
		{"1. A ploop volume: create, stage, publish, write files", s.stepVolume},
		{"2. Snapshot, write more, restore the snapshot into a new volume", s.stepSnapshot},
		{"3. Expand the volume online", s.stepExpand},
		{"4. A simfs volume: a directory with a project quota", s.stepSimfs},
		{"5. Clean up, and check that nothing is left", s.stepCleanUp},
	}
	start := time.Now()
	for _, st := range steps {
		s.printf("\n== %s\n", st.title)
		if err := st.run(ctx); err != nil {
			return fmt.Errorf("%s: %w", st.title, err)
		}
	}
	s.printf("\nDemo finished in %v: every step did what it showed.\n", time.Since(start).Round(time.Second))
	return nil
}

var safePath = regexp.MustCompile(`^[A-Za-z0-9/._-]+$`)

func (s *session) printf(format string, a ...any) { fmt.Fprintf(s.out, format, a...) }

// note prints an explanation.
func (s *session) note(format string, a ...any) { s.printf("# "+format+"\n", a...) }

// short shows a path as the printed commands do, below $W.
func (s *session) short(p string) string {
	if rest, ok := strings.CutPrefix(p, s.work); ok {
		return "$W" + rest
	}
	return p
}

// sh prints a shell command, runs it with W set to the work directory and
// prints its output; a non-zero exit is an error.
func (s *session) sh(ctx context.Context, script string) (string, error) {
	out, err := s.shAllowFail(ctx, script)
	if err != nil {
		return out, fmt.Errorf("%s: %w", script, err)
	}
	return out, nil
}

// shAllowFail is sh for a command that is expected to fail: its error is
// the command's.
func (s *session) shAllowFail(ctx context.Context, script string) (string, error) {
	s.printf("$ %s\n", script)
	cmd := exec.CommandContext(ctx, "sh", "-c", script)
	cmd.Env = append(os.Environ(), "W="+s.work, "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w: %w", err, ctx.Err()) // the demo's time ran out
	}
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		if l != "" {
			s.printf("  %s\n", l)
		}
	}
	return string(out), err
}

// setUp makes the storage root, starts ploop-csi and waits for it.
func (s *session) setUp(ctx context.Context) error {
	s.note("W=%s is the demo's work directory; it is removed at the end.", s.work)
	s.note("The storage root: a sparse 1 GiB ext4 file system with project quota, on a loop device")
	s.note("(simfs volumes are directories of the root, limited by project quota).")
	if _, err := s.sh(ctx, fmt.Sprintf("truncate -s %dM $W/disk.img", rootMiB)); err != nil {
		return err
	}
	// mkfs on the file, not on its loop device: a loop device over tmpfs
	// (the VM's /tmp) refuses mkfs's WRITE_ZEROES, and the kernel would log
	// each refusal on the VM's console.
	if _, err := s.sh(ctx, "mkfs.ext4 -q -O quota,project -E "+mkfsExtended(ctx)+" $W/disk.img"); err != nil {
		return err
	}
	if _, err := s.sh(ctx, "mkdir $W/disk && mount -o loop,prjquota $W/disk.img $W/disk"); err != nil {
		return err
	}
	s.mounted = true
	if _, err := s.sh(ctx, "mkdir -m 700 $W/disk/root && findmnt -n -o SOURCE,FSTYPE,OPTIONS $W/disk"); err != nil {
		return err
	}
	s.root = filepath.Join(s.work, "disk", "root")

	s.nbdPre = map[string]bool{}
	for _, dev := range s.connectedNBD() {
		s.nbdPre[dev] = true // not the demo's: left alone, and not held against it
	}

	sock := filepath.Join(s.work, "csi.sock")
	args := []string{"--mode", "all", "--nodeid", nodeID, "--storage-root", s.root, "--kubelet-dir", s.work, "--v", "2"}
	s.note("ploop-csi serves identity, controller and node on a 0600 unix socket; no network port.")
	s.note("--kubelet-dir confines staging and target paths to $W, as kubelet's directory would.")
	shown := []string{"--endpoint", "unix://" + s.short(sock)}
	for _, a := range args {
		shown = append(shown, strings.ReplaceAll(a, s.work, "$W"))
	}
	logTo := s.cfg.DriverLog
	redirect := ""
	if logTo == nil {
		s.driverLog = filepath.Join(s.work, "ploop-csi.log")
		f, err := os.Create(s.driverLog)
		if err != nil {
			return err
		}
		defer f.Close() // the child has its own descriptor
		logTo = f
		redirect = " >$W/ploop-csi.log 2>&1"
	}
	s.printf("$ %s %s%s &\n", s.cfg.Driver, strings.Join(shown, " "), redirect)
	s.printf("> Probe\n")
	var err error
	s.driver, err = driverproc.Start(ctx, driverproc.Config{Binary: s.cfg.Driver, Socket: sock, Args: args, Output: logTo})
	if err != nil {
		return err
	}
	s.ident, s.ctl, s.node = s.driver.Identity, s.driver.Controller, s.driver.Node
	s.printf("< ready=true\n")
	s.printf("> GetPluginInfo\n")
	info, err := s.ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return fmt.Errorf("GetPluginInfo: %w", err)
	}
	s.printf("< name=%s vendor_version=%s\n", info.GetName(), info.GetVendorVersion())
	s.printf("> NodeGetInfo\n")
	ni, err := s.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return fmt.Errorf("NodeGetInfo: %w", err)
	}
	s.printf("< node_id=%s max_volumes_per_node=%d accessible_topology=%s\n",
		ni.GetNodeId(), ni.GetMaxVolumesPerNode(), topology(ni.GetAccessibleTopology().GetSegments()))
	return nil
}

// mkfsExtended is mkfs.ext4's -E for the fresh sparse file, which reads as
// zeroes: nothing needs zeroing (assume_storage_prezeroed, e2fsprogs 1.47;
// most of it is lazy in older versions) or discarding.
func mkfsExtended(ctx context.Context) string {
	out, _ := exec.CommandContext(ctx, "mkfs.ext4", "-V").CombinedOutput()
	var major, minor int
	if _, err := fmt.Sscanf(string(out), "mke2fs %d.%d", &major, &minor); err == nil && (major > 1 || major == 1 && minor >= 47) {
		return "assume_storage_prezeroed=1,nodiscard"
	}
	return "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
}

// mountCap is a filesystem volume's capability; fsType "" for simfs.
func mountCap(fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// createVolume calls CreateVolume and prints it.
func (s *session) createVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.Volume, error) {
	line := fmt.Sprintf("> CreateVolume name=%s parameters=%s", req.GetName(), params(req.GetParameters()))
	if fs := req.GetVolumeCapabilities()[0].GetMount().GetFsType(); fs != "" {
		line += " fs_type=" + fs
	}
	line += " required_bytes=" + size(req.GetCapacityRange().GetRequiredBytes())
	if src := req.GetVolumeContentSource().GetSnapshot(); src != nil {
		line += " volume_content_source.snapshot_id=" + src.GetSnapshotId()
	}
	s.printf("%s\n", line)
	resp, err := s.ctl.CreateVolume(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("CreateVolume %s: %w", req.GetName(), err)
	}
	v := resp.GetVolume()
	s.volumes = append(s.volumes, v.GetVolumeId())
	var topo []string
	for _, t := range v.GetAccessibleTopology() {
		topo = append(topo, topology(t.GetSegments()))
	}
	s.printf("< volume_id=%s capacity_bytes=%s accessible_topology=%s\n", v.GetVolumeId(), size(v.GetCapacityBytes()), strings.Join(topo, ","))
	if v.GetCapacityBytes() < req.GetCapacityRange().GetRequiredBytes() {
		return nil, fmt.Errorf("CreateVolume %s: capacity %d below the %d asked for", req.GetName(), v.GetCapacityBytes(), req.GetCapacityRange().GetRequiredBytes())
	}
	return v, nil
}

// stageAndPublish stages v at $W/staging/NAME and publishes it at
// $W/pods/NAME, as kubelet would for a pod; it returns the target path.
func (s *session) stageAndPublish(ctx context.Context, v *csi.Volume, name string, vc *csi.VolumeCapability, what string) (string, error) {
	staging := filepath.Join(s.work, "staging", name)
	target := filepath.Join(s.work, "pods", name)
	// kubelet makes the staging directory and the target's parent.
	for _, d := range []string{staging, filepath.Dir(target)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	id := v.GetVolumeId()
	s.printf("> NodeStageVolume volume_id=%s staging_target_path=%s\n", id, s.short(staging))
	s.note("%s", what)
	s.staged[id] = staging
	if _, err := s.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: vc, VolumeContext: v.GetVolumeContext()}); err != nil {
		return "", fmt.Errorf("NodeStageVolume %s: %w", id, err)
	}
	s.printf("< ok\n")
	s.printf("> NodePublishVolume volume_id=%s target_path=%s\n", id, s.short(target))
	s.note("a bind mount of the staged volume where the pod sees it")
	s.published[id] = target
	if _, err := s.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target,
		VolumeCapability: vc, VolumeContext: v.GetVolumeContext()}); err != nil {
		return "", fmt.Errorf("NodePublishVolume %s: %w", id, err)
	}
	s.printf("< ok\n")
	return target, nil
}
