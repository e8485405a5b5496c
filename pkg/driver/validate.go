package driver

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// Everything a request carries is checked here before any call below: ids
// by package catalog (a string that could escape a path is
// catalog.ErrInvalid, a safe string that names no object of ours is
// catalog.ErrNotFound), paths for shape and place, capabilities and
// parameters for what this driver supports.

// StorageClass parameters (CreateVolume's parameters) and the keys of the
// volume context CreateVolume returns.
const (
	ParamType        = "type"
	ParamClusterSize = "clusterSize"
	ParamMkfsOptions = "mkfsOptions"
	ParamInodes      = "inodes"
	ParamDiscard     = "discard"
	// ParamAttach asks that a ploop volume reach the kernel through nbd
	// or ublk on every node that stages it, whatever the node's default
	// (--attach). It is a wish of the StorageClass, not a property of the
	// data: it travels in the volume context, not in the catalogue.
	ParamAttach = "attach"
	// ParamFSType is the StorageClass's filesystem as the provisioner
	// passes it when it does not turn it into the capability's fs_type.
	ParamFSType = "csi.storage.k8s.io/fstype"
	// ContextFSType is the volume context's filesystem key.
	ContextFSType = "fsType"

	// reservedPrefix marks keys Kubernetes' sidecars add (PVC name and
	// namespace, secrets); they are accepted and ignored.
	reservedPrefix = "csi.storage.k8s.io/"
)

const (
	// maxPathLength is PATH_MAX less the terminating NUL.
	maxPathLength = 4095
	// maxMountFlags and maxMountFlagLength bound a capability's mount
	// flags.
	maxMountFlags      = 64
	maxMountFlagLength = 256
)

// volumeID checks a required volume id and returns the volume's type. A
// snapshot id where a volume id belongs is the caller mixing them up, not a
// volume that is gone: InvalidArgument.
func volumeID(field, id string) (catalog.Type, error) {
	if id == "" {
		return "", fmt.Errorf("%s is required: %w", field, catalog.ErrInvalid)
	}
	typ, err := catalog.ParseVolumeID(id)
	if errors.Is(err, catalog.ErrNotFound) && catalog.ValidateSnapshotID(id) == nil {
		return "", fmt.Errorf("%s %s is a snapshot id, not a volume id: %w", field, id, catalog.ErrInvalid)
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", field, err)
	}
	return typ, nil
}

// snapshotID checks a required snapshot id; a volume id there is invalid.
func snapshotID(field, id string) error {
	if id == "" {
		return fmt.Errorf("%s is required: %w", field, catalog.ErrInvalid)
	}
	err := catalog.ValidateSnapshotID(id)
	if errors.Is(err, catalog.ErrNotFound) {
		if _, verr := catalog.ParseVolumeID(id); verr == nil {
			return fmt.Errorf("%s %s is a volume id, not a snapshot id: %w", field, id, catalog.ErrInvalid)
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	return nil
}

// required checks that a field is set, before its content is looked at:
// the spec's "missing required field" is InvalidArgument even when another
// field names nothing.
// volumeAt checks what every node call names: a volume id and a path, both
// present, the id of a form this driver gives out and the path one check
// accepts (mountPath or lookupPath). It returns the volume's type. An id
// of no form of ours is catalog.ErrNotFound, before the path is checked:
// the undo calls (unstage, unpublish) answer it with success.
func volumeAt(id, pathField, path string, check func(field, p string) error) (catalog.Type, error) {
	if err := required("volume_id", id, pathField, path); err != nil {
		return "", err
	}
	typ, err := volumeID("volume_id", id)
	if err != nil {
		return "", err
	}
	return typ, check(pathField, path)
}

func required(fields ...string) error {
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i+1] == "" {
			return fmt.Errorf("%s is required: %w", fields[i], catalog.ErrInvalid)
		}
	}
	return nil
}

// rangeShape checks a capacity range that is compared with a volume's
// size rather than handed to the catalogue (NodeExpandVolume): negative
// sizes, or a limit below what is required, are no range at all.
func rangeShape(field string, cr *csi.CapacityRange) error {
	req, lim := cr.GetRequiredBytes(), cr.GetLimitBytes()
	switch {
	case req < 0 || lim < 0:
		return fmt.Errorf("%s [%d, %d] is negative: %w", field, req, lim, catalog.ErrInvalid)
	case lim > 0 && req > lim:
		return fmt.Errorf("%s: required %d bytes exceed the limit of %d: %w", field, req, lim, catalog.ErrInvalid)
	}
	return nil
}

// pathShape checks what any path must be before it is compared or used:
// set, bounded, without NUL, absolute and clean.
func pathShape(field, p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%s is required: %w", field, catalog.ErrInvalid)
	case len(p) > maxPathLength:
		return fmt.Errorf("%s is %d bytes long, more than %d: %w", field, len(p), maxPathLength, catalog.ErrInvalid)
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("%s %q contains a NUL byte: %w", field, p, catalog.ErrInvalid)
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return fmt.Errorf("%s %q must be an absolute, clean path: %w", field, p, catalog.ErrInvalid)
	}
	return nil
}

// within reports whether p is dir or lies below it (both clean).
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// mountPath checks a staging or target path the node will mount on: its
// shape, that it is not in the storage root (a bind mount there could hide
// or expose volumes), and, when the driver was given path prefixes (the
// kubelet's directory), that it lies below one.
func (d *Driver) mountPath(field, p string) error {
	if err := pathShape(field, p); err != nil {
		return err
	}
	if root := d.cfg.Catalog.Root(); within(p, root) || within(root, p) {
		return fmt.Errorf("%s %s overlaps the storage root %s: %w", field, p, root, catalog.ErrInvalid)
	}
	if len(d.cfg.PathPrefixes) == 0 {
		return nil
	}
	for _, prefix := range d.cfg.PathPrefixes {
		if within(p, prefix) && p != prefix {
			return nil
		}
	}
	return fmt.Errorf("%s %s is not below %s: %w", field, p, strings.Join(d.cfg.PathPrefixes, " or "), catalog.ErrInvalid)
}

// lookupPath checks a path that only names where the CO sees a volume
// (NodeGetVolumeStats, NodeExpandVolume): the node compares it with the
// paths it staged and published at, which all passed mountPath. So a path
// that could not be a path at all is invalid, and one that is not where any
// volume can be (relative, in the storage root, outside the kubelet's
// directory) names no volume: NotFound.
func (d *Driver) lookupPath(field, p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%s is required: %w", field, catalog.ErrInvalid)
	case len(p) > maxPathLength || strings.ContainsRune(p, 0):
		return pathShape(field, p)
	}
	if err := d.mountPath(field, p); err != nil {
		return fmt.Errorf("no volume is at %s %q (%v): %w", field, p, err, catalog.ErrNotFound)
	}
	return nil
}

// capability is a checked VolumeCapability.
type capability struct {
	mode       csi.VolumeCapability_AccessMode_Mode
	block      bool
	fsType     string // "" when the capability does not say
	mountFlags []string
}

// singleNodeModes are the access modes this driver supports: its volumes
// live on one node.
var singleNodeModes = []csi.VolumeCapability_AccessMode_Mode{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
}

// parseCapability checks one capability: a single-node access mode, mount
// (ext4 or xfs, or unsaid) or block access, and sane mount flags.
func parseCapability(c *csi.VolumeCapability) (capability, error) {
	if c == nil {
		return capability{}, fmt.Errorf("volume_capability is required: %w", catalog.ErrInvalid)
	}
	var out capability
	am := c.GetAccessMode()
	if am == nil {
		return out, fmt.Errorf("volume_capability.access_mode is required: %w", catalog.ErrInvalid)
	}
	out.mode = am.GetMode()
	switch {
	case slices.Contains(singleNodeModes, out.mode):
	case strings.HasPrefix(out.mode.String(), "MULTI_NODE_"):
		return out, fmt.Errorf("access mode %s is not supported: ploop-csi volumes are node-local "+
			"(a ploop image is served by the one node whose storage root holds it, a simfs directory is on "+
			"one node's filesystem), so only one node can use a volume; use a single-node access mode "+
			"(ReadWriteOnce, ReadWriteOncePod): %w", out.mode, catalog.ErrInvalid)
	default:
		return out, fmt.Errorf("access mode %s is not supported (want one of %v): %w", out.mode, singleNodeModes, catalog.ErrInvalid)
	}
	switch t := c.GetAccessType().(type) {
	case *csi.VolumeCapability_Block:
		out.block = true
	case *csi.VolumeCapability_Mount:
		m := t.Mount
		switch fs := m.GetFsType(); fs {
		case "", catalog.FSExt4, catalog.FSXfs:
			out.fsType = fs
		default:
			return out, fmt.Errorf("fs_type %q is not supported: use %s (the default) or %s: %w", fs, catalog.FSExt4, catalog.FSXfs, catalog.ErrInvalid)
		}
		flags, err := mountFlags(m.GetMountFlags())
		if err != nil {
			return out, err
		}
		out.mountFlags = flags
	default:
		return out, fmt.Errorf("volume_capability.access_type (mount or block) is required: %w", catalog.ErrInvalid)
	}
	return out, nil
}

// mountFlags checks the options a capability asks to mount with. They go
// to mount(8) through mount-utils as one comma-joined argument, so control
// bytes are refused; the CO's administrator chooses them, so their meaning
// is not second-guessed.
func mountFlags(in []string) ([]string, error) {
	if len(in) > maxMountFlags {
		return nil, fmt.Errorf("%d mount flags, more than %d: %w", len(in), maxMountFlags, catalog.ErrInvalid)
	}
	for _, f := range in {
		if f == "" || len(f) > maxMountFlagLength {
			return nil, fmt.Errorf("mount flag %q: empty or longer than %d bytes: %w", f, maxMountFlagLength, catalog.ErrInvalid)
		}
		for i := 0; i < len(f); i++ {
			if b := f[i]; b < ' ' || b > '~' {
				return nil, fmt.Errorf("mount flag %q has byte %q at %d (printable ASCII only): %w", f, b, i, catalog.ErrInvalid)
			}
		}
	}
	return slices.Clone(in), nil
}

// fits checks that a capability can be used with a volume of type t
// holding fsType: simfs volumes are directories (no Block), and a ploop
// volume's filesystem is fixed at creation. The error class is the
// caller's: InvalidArgument for requests, FailedPrecondition on the node
// (the spec's "exceeds capabilities").
func (c capability) fits(t catalog.Type, fsType string, class error) error {
	if c.block && t == catalog.Simfs {
		return fmt.Errorf("block access is not possible for a simfs volume (a directory with a quota); "+
			"use type %s for block volumes: %w", catalog.Ploop, class)
	}
	if !c.block && t == catalog.Ploop && c.fsType != "" && fsType != "" && c.fsType != fsType {
		return fmt.Errorf("the volume holds %s, the capability asks for %s: %w", fsType, c.fsType, class)
	}
	return nil
}

// volumeParams are CreateVolume's parameters (a StorageClass's).
type volumeParams struct {
	typ         catalog.Type
	clusterSize int64
	mkfsOptions string
	inodes      uint64
	discard     string
	fsType      string
	attach      string
}

// parseParams checks the parameters a volume is created with (or a capacity
// asked for). Unknown keys are refused, so that a misspelt parameter does
// not silently give a volume other than the one meant; keys under
// csi.storage.k8s.io/ are the sidecars' and are ignored, except the
// filesystem.
func parseParams(in map[string]string) (volumeParams, error) {
	p := volumeParams{typ: catalog.Ploop}
	for _, k := range sortedKeys(in) {
		v := in[k]
		bad := func(want string) error {
			return fmt.Errorf("parameter %s=%q: want %s: %w", k, v, want, catalog.ErrInvalid)
		}
		switch k {
		case ParamType:
			switch catalog.Type(v) {
			case catalog.Ploop, catalog.Simfs:
				p.typ = catalog.Type(v)
			default:
				return p, bad(fmt.Sprintf("%s or %s", catalog.Ploop, catalog.Simfs))
			}
		case ParamClusterSize:
			n, err := parseSize(v)
			if err != nil {
				return p, bad("a power of two from 32K to 64M, e.g. 1M")
			}
			p.clusterSize = n
		case ParamMkfsOptions:
			p.mkfsOptions = v // checked by the catalogue (printable ASCII, bounded)
		case ParamInodes:
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil || n == 0 {
				return p, bad("a positive number of inodes")
			}
			p.inodes = n
		case ParamDiscard:
			if v != catalog.DiscardPeriodic && v != catalog.DiscardOnline {
				return p, bad(fmt.Sprintf("%s (the default: trimmed every --trim-interval) or %s", catalog.DiscardPeriodic, catalog.DiscardOnline))
			}
			p.discard = v
		case ParamAttach:
			if err := checkAttach(v); err != nil {
				return p, err
			}
			p.attach = v
		case ParamFSType:
			if v != "" && v != catalog.FSExt4 && v != catalog.FSXfs {
				return p, bad(fmt.Sprintf("%s or %s", catalog.FSExt4, catalog.FSXfs))
			}
			p.fsType = v
		default:
			if strings.HasPrefix(k, reservedPrefix) {
				continue
			}
			return p, fmt.Errorf("unknown parameter %q (known: %s, %s, %s, %s, %s, %s): %w",
				k, ParamType, ParamClusterSize, ParamMkfsOptions, ParamInodes, ParamDiscard, ParamAttach, catalog.ErrInvalid)
		}
	}
	if p.attach != "" && p.typ != catalog.Ploop {
		return p, fmt.Errorf("parameter %s applies to %s=%s volumes only: %w", ParamAttach, ParamType, catalog.Ploop, catalog.ErrInvalid)
	}
	return p, nil
}

// Attach transports a volume may ask for (ParamAttach).
const (
	AttachNBD  = "nbd"
	AttachUblk = "ublk"
)

// checkAttach checks a requested transport, from the parameters or a
// volume context; "" is the node's default.
func checkAttach(v string) error {
	if v != "" && v != AttachNBD && v != AttachUblk {
		return fmt.Errorf("%s=%q: want %s or %s (or leave it out for the node's default): %w", ParamAttach, v, AttachNBD, AttachUblk, catalog.ErrInvalid)
	}
	return nil
}

// volumeContext is what the node needs to stage a volume, returned by
// CreateVolume so that a node process without the catalogue can stage it.
func volumeContext(v catalog.Volume) map[string]string {
	ctx := map[string]string{ParamType: string(v.Type)}
	switch v.Type {
	case catalog.Ploop:
		ctx[ContextFSType] = v.FSType
		ctx[ParamClusterSize] = strconv.FormatInt(v.ClusterSize, 10)
		ctx[ParamDiscard] = v.Discard
		if v.MkfsOptions != "" {
			ctx[ParamMkfsOptions] = v.MkfsOptions
		}
	case catalog.Simfs:
		ctx[ParamInodes] = strconv.FormatUint(v.Inodes, 10)
	}
	return ctx
}

// checkContext checks a volume context a CO hands back against the volume
// the catalogue has: the keys this driver wrote must say what the volume
// is. Other keys (the kubelet's pod information) are ignored.
func checkContext(in map[string]string, v catalog.Volume) error {
	want := volumeContext(v)
	for _, k := range sortedKeys(want) {
		if got, ok := in[k]; ok && got != want[k] {
			return fmt.Errorf("volume context says %s=%q, but volume %s has %q: %w", k, got, v.ID, want[k], catalog.ErrInvalid)
		}
	}
	return nil
}

// parseSize parses a byte count: a number of bytes, optionally followed by
// "B", or a number with a binary unit K, M, G, T or P, optionally followed by
// "i", "iB" or "B" (64K, 1Mi, 1MiB, 1MB = 2^20), case-insensitive.
func parseSize(s string) (int64, error) {
	t := strings.ToUpper(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q does not start with a number", s)
	}
	shift := 0
	switch rest := t[i:]; rest {
	case "", "B":
	default:
		u := strings.IndexByte("KMGTP", rest[0])
		if u < 0 {
			return 0, fmt.Errorf("size %q: unknown unit (want K, M, G, T or P)", s)
		}
		switch rest[1:] {
		case "", "I", "IB", "B":
		default:
			return 0, fmt.Errorf("size %q: unknown unit (want K, M, G, T or P)", s)
		}
		shift = 10 * (u + 1)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n << shift, nil
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
