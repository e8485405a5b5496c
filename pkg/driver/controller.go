package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

type controllerServer struct {
	csi.UnimplementedControllerServer
	d *Driver
}

func (s *controllerServer) ControllerGetCapabilities(ctx context.Context, req *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		controllerVolumeCondition,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// segment is the topology segment of node ("": this one): a node-local
// volume is reachable from its node only.
func (d *Driver) segment(node string) *csi.Topology {
	if node == "" {
		node = d.cfg.NodeID
	}
	return &csi.Topology{Segments: map[string]string{TopologyKey: node}}
}

// cluster is the catalogue spanning nodes' own roots in ModeController,
// nil otherwise.
func (d *Driver) cluster() Cluster {
	if d.cfg.Mode != ModeController || d.cfg.SharedRoot {
		return nil
	}
	return d.cfg.Catalog.(Cluster)
}

// place chooses the node for a new volume in ModeController: the node of
// its content source (a clone shares its source's deltas), which the
// requisite segments must then allow; otherwise the first preferred
// segment (the scheduler's choice under WaitForFirstConsumer), otherwise
// the first requisite one.
func (d *Driver) place(ctx context.Context, r *csi.TopologyRequirement, vr catalog.VolumeRequest) (string, error) {
	node := ""
	switch {
	case vr.SourceSnapshot != "":
		s, err := d.cfg.Catalog.GetSnapshot(ctx, vr.SourceSnapshot)
		if err != nil {
			return "", fmt.Errorf("source snapshot: %w", err)
		}
		node = s.Node
	case vr.SourceVolume != "":
		v, err := d.cfg.Catalog.GetVolume(ctx, vr.SourceVolume)
		if err != nil {
			return "", fmt.Errorf("source volume: %w", err)
		}
		node = v.Node
	}
	if node != "" {
		if req := r.GetRequisite(); len(req) > 0 && !slices.ContainsFunc(req, func(t *csi.Topology) bool { return t.GetSegments()[TopologyKey] == node }) {
			return "", fmt.Errorf("the content source is on node %s, which the accessibility requirements do not allow: %w", node, catalog.ErrNoSpace)
		}
		return node, nil
	}
	for _, ts := range [][]*csi.Topology{r.GetPreferred(), r.GetRequisite()} {
		for _, t := range ts {
			if n := t.GetSegments()[TopologyKey]; n != "" {
				return n, nil
			}
		}
	}
	return "", fmt.Errorf("accessibility_requirements name no node (%s): volumes live on one node's storage root; "+
		"use a StorageClass with volumeBindingMode WaitForFirstConsumer: %w", TopologyKey, catalog.ErrInvalid)
}

// ours reports whether a topology segment is this node's.
func (d *Driver) ours(t *csi.Topology) bool {
	return t.GetSegments()[TopologyKey] == d.cfg.NodeID
}

// placeable checks CreateVolume's accessibility requirements: a volume can
// only be where its storage root is, so some requisite segment must be this
// node's (preferred segments only order the requisite ones).
func (d *Driver) placeable(r *csi.TopologyRequirement) error {
	req := r.GetRequisite()
	if len(req) == 0 {
		return nil
	}
	for _, t := range req {
		if d.ours(t) {
			return nil
		}
	}
	var want []string
	for _, t := range req {
		want = append(want, fmt.Sprint(t.GetSegments()))
	}
	return fmt.Errorf("the volume can only be created on node %s (%s=%s), and the request requires %s: %w",
		d.cfg.NodeID, TopologyKey, d.cfg.NodeID, strings.Join(want, " or "), catalog.ErrNoSpace)
}

// csiVolume describes a volume to the CO.
func (d *Driver) csiVolume(v catalog.Volume) *csi.Volume {
	out := &csi.Volume{
		CapacityBytes: v.Size,
		VolumeId:      v.ID,
		VolumeContext: volumeContext(v),
	}
	if !d.cfg.SharedRoot {
		out.AccessibleTopology = []*csi.Topology{d.segment(v.Node)}
	}
	switch {
	case v.SourceSnapshot != "":
		out.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: v.SourceSnapshot}}}
	case v.SourceVolume != "":
		out.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.SourceVolume}}}
	}
	return out
}

// capabilities checks a request's capabilities (at least one) against a
// volume type and returns the filesystem they ask for ("" when none does).
func capabilities(caps []*csi.VolumeCapability, t catalog.Type, fsType string) (string, error) {
	if len(caps) == 0 {
		return "", fmt.Errorf("volume_capabilities are required: %w", catalog.ErrInvalid)
	}
	fs := ""
	for _, c := range caps {
		pc, err := parseCapability(c)
		if err != nil {
			return "", err
		}
		if err := pc.fits(t, fsType, catalog.ErrInvalid); err != nil {
			return "", err
		}
		if pc.fsType != "" {
			if fs != "" && fs != pc.fsType {
				return "", fmt.Errorf("the capabilities ask for both %s and %s: %w", fs, pc.fsType, catalog.ErrInvalid)
			}
			fs = pc.fsType
		}
	}
	return fs, nil
}

func (s *controllerServer) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	d := s.d
	if req.GetName() == "" {
		return nil, fmt.Errorf("name is required: %w", catalog.ErrInvalid)
	}
	p, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	fs, err := capabilities(req.GetVolumeCapabilities(), p.typ, "")
	if err != nil {
		return nil, err
	}
	switch {
	case fs == "":
		fs = p.fsType
	case p.fsType != "" && p.fsType != fs:
		return nil, fmt.Errorf("fs_type %s and parameter %s=%s disagree: %w", fs, ParamFSType, p.fsType, catalog.ErrInvalid)
	}
	if p.typ == catalog.Simfs {
		if d.cfg.SharedRoot {
			return nil, fmt.Errorf("%s=%s needs the project quota of a node's own filesystem, and this driver's storage root is shared; "+
				"use %s=%s: %w", ParamType, catalog.Simfs, ParamType, catalog.Ploop, catalog.ErrInvalid)
		}
		fs = "" // a simfs volume is a directory of the root's own filesystem
	}
	vr := catalog.VolumeRequest{
		Name: req.GetName(), Type: p.typ, FSType: fs, ClusterSize: p.clusterSize,
		MkfsOptions: p.mkfsOptions, Inodes: p.inodes, Discard: p.discard,
	}
	if cr := req.GetCapacityRange(); cr != nil {
		vr.RequiredBytes, vr.LimitBytes = cr.GetRequiredBytes(), cr.GetLimitBytes()
	}
	if src := req.GetVolumeContentSource(); src != nil {
		switch {
		case src.GetSnapshot() != nil:
			vr.SourceSnapshot = src.GetSnapshot().GetSnapshotId()
			if err := snapshotID("volume_content_source.snapshot.snapshot_id", vr.SourceSnapshot); err != nil {
				return nil, err
			}
		case src.GetVolume() != nil:
			vr.SourceVolume = src.GetVolume().GetVolumeId()
			if _, err := volumeID("volume_content_source.volume.volume_id", vr.SourceVolume); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("volume_content_source has neither a snapshot nor a volume: %w", catalog.ErrInvalid)
		}
	}
	var v catalog.Volume
	if c := d.cluster(); c != nil {
		node, err := d.place(ctx, req.GetAccessibilityRequirements(), vr)
		if err != nil {
			return nil, err
		}
		if v, err = c.CreateVolumeOn(ctx, node, vr); err != nil {
			return nil, err
		}
	} else {
		// On a shared root every node reaches the volume: any
		// requirement is met.
		if !d.cfg.SharedRoot {
			if err := d.placeable(req.GetAccessibilityRequirements()); err != nil {
				return nil, err
			}
		}
		if v, err = d.cfg.Catalog.CreateVolume(ctx, vr); err != nil {
			return nil, err
		}
	}
	out := d.csiVolume(v)
	if p.attach != "" {
		out.VolumeContext[ParamAttach] = p.attach
	}
	return &csi.CreateVolumeResponse{Volume: out}, nil
}

func (s *controllerServer) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if _, err := volumeID("volume_id", req.GetVolumeId()); errors.Is(err, catalog.ErrNotFound) {
		return &csi.DeleteVolumeResponse{}, nil // no volume of ours can have this id: deleted
	} else if err != nil {
		return nil, err
	}
	if err := s.d.cfg.Catalog.DeleteVolume(ctx, req.GetVolumeId()); err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (s *controllerServer) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if _, err := volumeID("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, fmt.Errorf("volume_capabilities are required: %w", catalog.ErrInvalid)
	}
	v, err := s.d.cfg.Catalog.GetVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	unconfirmed := func(err error) (*csi.ValidateVolumeCapabilitiesResponse, error) {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	if _, err := capabilities(req.GetVolumeCapabilities(), v.Type, v.FSType); err != nil {
		return unconfirmed(err)
	}
	if err := checkContext(req.GetVolumeContext(), v); err != nil {
		return unconfirmed(err)
	}
	if len(req.GetParameters()) > 0 {
		p, err := parseParams(req.GetParameters())
		if err != nil {
			return unconfirmed(err)
		}
		if p.typ != v.Type {
			return unconfirmed(fmt.Errorf("volume %s is of type %s, the parameters ask for %s", v.ID, v.Type, p.typ))
		}
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
		MutableParameters:  req.GetMutableParameters(),
	}}, nil
}

// condition is the catalogue's view of a volume's health; a volume whose
// condition cannot be read is reported abnormal with the reason.
func (d *Driver) condition(ctx context.Context, id string) Condition {
	c, err := d.cfg.Catalog.Condition(ctx, id)
	if err != nil {
		return Condition{Abnormal: true, Message: fmt.Sprintf("the volume's condition cannot be read: %v", err)}
	}
	return Condition{Abnormal: c.Abnormal, Message: c.Message}
}

// maxEntries checks a list request's max_entries.
func maxEntries(n int32) (int, error) {
	if n < 0 {
		return 0, fmt.Errorf("max_entries %d is negative: %w", n, catalog.ErrInvalid)
	}
	return int(n), nil
}

func (s *controllerServer) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	max, err := maxEntries(req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	vs, next, err := s.d.cfg.Catalog.ListVolumes(ctx, req.GetStartingToken(), max)
	if err != nil {
		return nil, err
	}
	out := &csi.ListVolumesResponse{NextToken: next}
	for _, v := range vs {
		st := &csi.ListVolumesResponse_VolumeStatus{}
		setCondition(st, s.d.condition(ctx, v.ID))
		out.Entries = append(out.Entries, &csi.ListVolumesResponse_Entry{Volume: s.d.csiVolume(v), Status: st})
	}
	return out, nil
}

func (s *controllerServer) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	if _, err := volumeID("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	v, err := s.d.cfg.Catalog.GetVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	st := &csi.ControllerGetVolumeResponse_VolumeStatus{}
	setCondition(st, s.d.condition(ctx, v.ID))
	return &csi.ControllerGetVolumeResponse{Volume: s.d.csiVolume(v), Status: st}, nil
}

// GetCapacity reports what this node's root can still promise for volumes
// the request describes: nothing for another node's segment or for
// capabilities no volume here can have.
func (s *controllerServer) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	p, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	cl := s.d.cluster()
	if t := req.GetAccessibleTopology(); t != nil && cl == nil && !s.d.cfg.SharedRoot && !s.d.ours(t) {
		return &csi.GetCapacityResponse{AvailableCapacity: 0}, nil
	}
	if len(req.GetVolumeCapabilities()) > 0 {
		if _, err := capabilities(req.GetVolumeCapabilities(), p.typ, ""); err != nil {
			return &csi.GetCapacityResponse{AvailableCapacity: 0}, nil
		}
	}
	var c catalog.Capacity
	switch node := req.GetAccessibleTopology().GetSegments()[TopologyKey]; {
	case cl != nil && node != "":
		c, err = cl.CapacityOn(ctx, node, p.typ)
	case cl != nil && req.GetAccessibleTopology() != nil:
		return &csi.GetCapacityResponse{AvailableCapacity: 0}, nil // a segment of no node of ours
	default:
		c, err = s.d.cfg.Catalog.Capacity(ctx, p.typ)
	}
	if err != nil {
		return nil, err
	}
	if c.Refused != nil {
		s.d.log.V(2).Info("no capacity for this type of volume", "type", p.typ, "reason", c.Refused.Error())
	}
	return &csi.GetCapacityResponse{AvailableCapacity: c.AvailableBytes}, nil
}

// snapshotParams checks CreateSnapshot's parameters: none of the driver's
// own; the sidecars' csi.storage.k8s.io/ keys are ignored.
func snapshotParams(in map[string]string) error {
	for _, k := range sortedKeys(in) {
		if !strings.HasPrefix(k, reservedPrefix) {
			return fmt.Errorf("unknown snapshot parameter %q (snapshots take none): %w", k, catalog.ErrInvalid)
		}
	}
	return nil
}

func csiSnapshot(sn catalog.Snapshot) *csi.Snapshot {
	return &csi.Snapshot{
		SizeBytes:      sn.Size,
		SnapshotId:     sn.ID,
		SourceVolumeId: sn.SourceVolume,
		CreationTime:   timestamppb.New(sn.Created),
		// The snapshot exists in full when CreateSnapshot returns: O(1)
		// for ploop, a finished copy for simfs.
		ReadyToUse: true,
	}
}

func (s *controllerServer) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := required("name", req.GetName(), "source_volume_id", req.GetSourceVolumeId()); err != nil {
		return nil, err
	}
	if _, err := volumeID("source_volume_id", req.GetSourceVolumeId()); err != nil {
		return nil, err
	}
	if err := snapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	sn, err := s.d.cfg.Catalog.CreateSnapshot(ctx, req.GetName(), req.GetSourceVolumeId())
	if err != nil {
		return nil, err
	}
	return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(sn)}, nil
}

func (s *controllerServer) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if err := snapshotID("snapshot_id", req.GetSnapshotId()); errors.Is(err, catalog.ErrNotFound) {
		return &csi.DeleteSnapshotResponse{}, nil
	} else if err != nil {
		return nil, err
	}
	if err := s.d.cfg.Catalog.DeleteSnapshot(ctx, req.GetSnapshotId()); err != nil {
		return nil, err
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (s *controllerServer) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	if err := snapshotID("snapshot_id", req.GetSnapshotId()); err != nil {
		return nil, err
	}
	sn, err := s.d.cfg.Catalog.GetSnapshot(ctx, req.GetSnapshotId())
	if err != nil {
		return nil, err
	}
	return &csi.GetSnapshotResponse{Snapshot: csiSnapshot(sn)}, nil
}

func (s *controllerServer) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	max, err := maxEntries(req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	// A filter that could not be an id is invalid; one that names nothing
	// gives an empty list.
	f := catalog.SnapshotFilter{SnapshotID: req.GetSnapshotId(), SourceVolume: req.GetSourceVolumeId()}
	if f.SnapshotID != "" {
		if err := snapshotID("snapshot_id", f.SnapshotID); errors.Is(err, catalog.ErrNotFound) {
			return &csi.ListSnapshotsResponse{}, nil
		} else if err != nil {
			return nil, err
		}
	}
	if f.SourceVolume != "" {
		if _, err := volumeID("source_volume_id", f.SourceVolume); errors.Is(err, catalog.ErrNotFound) {
			return &csi.ListSnapshotsResponse{}, nil
		} else if err != nil {
			return nil, err
		}
	}
	sns, next, err := s.d.cfg.Catalog.ListSnapshots(ctx, f, req.GetStartingToken(), max)
	if err != nil {
		return nil, err
	}
	out := &csi.ListSnapshotsResponse{NextToken: next}
	for _, sn := range sns {
		out.Entries = append(out.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: csiSnapshot(sn)})
	}
	return out, nil
}

func (s *controllerServer) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	typ, err := volumeID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	cr := req.GetCapacityRange()
	if cr == nil {
		return nil, fmt.Errorf("capacity_range is required: %w", catalog.ErrInvalid)
	}
	if c := req.GetVolumeCapability(); c != nil {
		pc, err := parseCapability(c)
		if err != nil {
			return nil, err
		}
		if err := pc.fits(typ, "", catalog.ErrInvalid); err != nil {
			return nil, err
		}
	}
	size, node, err := s.d.cfg.Catalog.ExpandVolume(ctx, req.GetVolumeId(), cr.GetRequiredBytes(), cr.GetLimitBytes())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: node}, nil
}
