package csisanity

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/test/e2e/csidriver"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestSanityChild runs the suite when Run starts this binary as its child.
func TestSanityChild(t *testing.T) { Child(t) }

// TestKernel runs the real ploop-csi binary in mode all inside the test VM
// (real nbd, mkfs, mounts and project quota): Probe against a root that
// fills up and turns read-only, `make demo`'s lifecycle (demo_test.go), and
// csi-sanity for the five parameter sets of Sets, each on a fresh storage
// root, each leaving nothing behind.
func TestKernel(t *testing.T) {
	if InChild() {
		t.Skip("running as csi-sanity's child")
	}
	cases := []vmtest.Case{{Name: "Probe", Run: testProbe}, {Name: "DeleteInUse", Run: testDeleteInUse}, {Name: "Demo", Run: testDemo}}
	for _, set := range Sets() {
		cases = append(cases, vmtest.Case{Name: "Sanity_" + set.Name, Run: func(t *testing.T) { testSanity(t, set) }})
	}
	vmtest.Run(t, vmtest.Options{Timeout: 50 * time.Minute, Prepare: csidriver.Build}, cases)
}

// TestKernelUblk runs csi-sanity's ploop-ext4 set with its volumes
// attached through ublk (the StorageClass parameter), on the 6.12 kernel.
func TestKernelUblk(t *testing.T) {
	if InChild() {
		t.Skip("running as csi-sanity's child")
	}
	set := UblkSet()
	vmtest.Run(t, vmtest.Options{Kernel: vmtest.Kernel612, Timeout: 30 * time.Minute, Prepare: csidriver.Build},
		[]vmtest.Case{{Name: "Sanity_" + set.Name, Run: func(t *testing.T) { testSanity(t, set) }}})
}

// driverProc is a running ploop-csi (test/e2e/csidriver) as this file
// uses it.
type driverProc struct {
	*csidriver.Driver
	conn *grpc.ClientConn
	sock string
}

// startDriver runs ploop-csi in mode all on root and waits until it
// answers Probe.
func startDriver(t *testing.T, ctx context.Context, root, work string, extra ...string) *driverProc {
	t.Helper()
	d := csidriver.Start(t, ctx, csidriver.Config{Root: root, Socket: filepath.Join(work, "csi.sock"), NodeID: "sanity-vm", Args: extra})
	return &driverProc{Driver: d, conn: d.Conn, sock: d.Socket}
}

// stop sends SIGTERM and expects a clean exit.
func (d *driverProc) stop(t *testing.T) { d.Stop(t) }

// checkLog fails t for every call the driver failed as its own fault
// (Internal, Unavailable, ...: logged as errors) and for every other error
// it logged. csi-sanity accepts any error code for some requests, so a
// node failure could otherwise pass as a refusal.
func (d *driverProc) checkLog(t *testing.T) { d.CheckLog(t) }

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// testProbe: Probe answers ready on a usable root and fails with the reason
// while the root is full and after ext4 turned it read-only on an error.
func testProbe(t *testing.T) {
	ctx := testCtx(t, 5*time.Minute)
	mnt := vmtest.ScratchFS(t, "ext4", 256)
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	d := startDriver(t, ctx, root, t.TempDir())
	id := csi.NewIdentityClient(d.conn)
	probe := func(want codes.Code, substr string) {
		t.Helper()
		_, err := id.Probe(ctx, &csi.ProbeRequest{})
		if status.Code(err) != want || !strings.Contains(status.Convert(err).Message(), substr) {
			t.Fatalf("probe: %v, want %v saying %q", err, want, substr)
		}
	}
	probe(codes.OK, "")

	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(st.Bavail)*st.Bsize-(4<<20)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	probe(codes.FailedPrecondition, "full")
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	probe(codes.OK, "")

	// A read-only bind mount over the root: the root as the driver sees
	// it by path is read-only (the catalogue's open lock file keeps the
	// filesystem itself from being remounted read-only under it).
	for _, args := range [][]string{{"--bind", root, root}, {"-o", "remount,bind,ro", root}} {
		testcmd.Combined(t, "mount", args...)
	}
	probe(codes.FailedPrecondition, "read-only")
	if err := unix.Unmount(root, 0); err != nil {
		t.Fatal(err)
	}
	probe(codes.OK, "")
	d.stop(t)
}

// testSanity runs csi-sanity for one set against the real driver on a
// fresh root, then checks the driver stops cleanly and leaves no volume,
// snapshot, mount or nbd connection behind.
func testSanity(t *testing.T, set Set) {
	ctx := testCtx(t, 40*time.Minute)
	mnt := vmtest.ScratchFS(t, set.RootFS, 1024)
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp("/tmp", "sanity-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	// Thin volumes: the suite's volumes together are far larger than the
	// scratch root, and take almost nothing.
	d := startDriver(t, ctx, root, work, "--overcommit-ratio", "100", "--kubelet-dir", work)
	r := Run(ctx, t, "TestSanityChild", set, "unix://"+d.sock, work)
	r.Check(t)
	d.stop(t)
	d.checkLog(t)
	if a := set.Params["attach"]; a == "ublk" && !strings.Contains(d.Log(), "attached volume through ublk") {
		t.Errorf("the set asks for ublk, and the driver attached nothing through it")
	}

	// Records, images and directories of both types, and the node's
	// records of what it has staged.
	for _, dir := range []string{"catalog/volumes", "catalog/snapshots", "ploop/volumes", "ploop/snapshots",
		"simfs/volumes", "simfs/snapshots", "nodes/sanity-vm/volumes"} {
		if ents, err := os.ReadDir(filepath.Join(root, dir)); err != nil || len(ents) != 0 {
			t.Errorf("%s after the suite: %v %v", dir, names(ents), err)
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, work) || strings.Contains(l, root) {
				t.Errorf("mount left behind: %s", l)
			}
		}
	}
	pids, _ := filepath.Glob("/sys/block/nbd*/pid")
	if len(pids) != 0 {
		t.Errorf("nbd devices still connected: %v", pids)
	}
	if ublks, _ := filepath.Glob("/sys/block/ublkb*"); len(ublks) != 0 {
		t.Errorf("ublk devices left: %v", ublks)
	}
}

func names(ents []os.DirEntry) []string {
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// testDeleteInUse: a volume of either type that is staged and published on
// the node is not deleted (FailedPrecondition) and its data stays; once
// unpublished and unstaged it is. A simfs volume has no stack lock to
// refuse the deletion: the node's attachments must say it is staged.
func testDeleteInUse(t *testing.T) {
	ctx := testCtx(t, 5*time.Minute)
	mnt := vmtest.ScratchFS(t, "ext4", 512)
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	d := startDriver(t, ctx, root, work, "--kubelet-dir", work)
	ctl, node := csi.NewControllerClient(d.conn), csi.NewNodeClient(d.conn)
	for _, typ := range []string{"simfs", "ploop"} {
		t.Run(typ, func(t *testing.T) {
			mount := &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			}
			v, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "in-use-" + typ, Parameters: map[string]string{"type": typ},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mount}})
			if err != nil {
				t.Fatal(err)
			}
			id := v.GetVolume().GetVolumeId()
			staging, target := filepath.Join(work, typ, "staging"), filepath.Join(work, typ, "target")
			if err := os.MkdirAll(staging, 0o750); err != nil {
				t.Fatal(err)
			}
			if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				VolumeCapability: mount, VolumeContext: v.GetVolume().GetVolumeContext()}); err != nil {
				t.Fatal(err)
			}
			if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target,
				VolumeCapability: mount, VolumeContext: v.GetVolume().GetVolumeContext()}); err != nil {
				t.Fatal(err)
			}
			data := filepath.Join(target, "data")
			if err := os.WriteFile(data, []byte("still here"), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err = ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			if status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("DeleteVolume of a published %s volume: %v, want FailedPrecondition", typ, err)
			}
			if b, err := os.ReadFile(data); err != nil || string(b) != "still here" {
				t.Fatalf("the volume's data after the refused deletion: %q, %v", b, err)
			}
			if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			_, err = ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			if status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("DeleteVolume of a staged %s volume: %v, want FailedPrecondition", typ, err)
			}
			if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatal(err)
			}
			if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Fatalf("DeleteVolume after unstage: %v", err)
			}
		})
	}
	d.stop(t)
	d.checkLog(t)
}
