package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

type nodeServer struct {
	csi.UnimplementedNodeServer
	d *Driver
}

func (s *nodeServer) NodeGetCapabilities(ctx context.Context, req *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		nodeVolumeCondition,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (s *nodeServer) NodeGetInfo(ctx context.Context, req *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	out := &csi.NodeGetInfoResponse{
		NodeId:            s.d.cfg.NodeID,
		MaxVolumesPerNode: int64(s.d.cfg.Node.MaxVolumes()),
	}
	if !s.d.cfg.SharedRoot {
		out.AccessibleTopology = s.d.segment("")
	}
	return out, nil
}

// nodeVolume looks up the volume a node call names and checks that the
// capability and volume context fit it: the catalogue's record is the
// truth; what the CO hands back must agree with it.
func (d *Driver) nodeVolume(ctx context.Context, id string, c capability, volCtx map[string]string) (catalog.Volume, error) {
	v, err := d.cfg.Catalog.GetVolume(ctx, id)
	if err != nil {
		return v, err
	}
	if err := c.fits(v.Type, v.FSType, catalog.ErrPrecondition); err != nil {
		return v, err
	}
	if err := checkContext(volCtx, v); err != nil {
		return v, err
	}
	return v, nil
}

func (s *nodeServer) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	d := s.d
	if _, err := volumeAt(req.GetVolumeId(), "staging_target_path", req.GetStagingTargetPath(), d.mountPath); err != nil {
		return nil, err
	}
	c, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	v, err := d.nodeVolume(ctx, req.GetVolumeId(), c, req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	path, err := d.cfg.Catalog.VolumePath(v.ID)
	if err != nil {
		return nil, err
	}
	sr := StageRequest{VolumeID: v.ID, Type: v.Type, Path: path, StagingPath: req.GetStagingTargetPath(), Block: c.block}
	if v.Type == catalog.Ploop {
		sr.Transport = req.GetVolumeContext()[ParamAttach]
		if err := checkAttach(sr.Transport); err != nil {
			return nil, err
		}
	}
	if v.Type == catalog.Ploop && !c.block {
		sr.FSType = v.FSType
		sr.MkfsOptions = strings.Fields(v.MkfsOptions)
		sr.MountOptions = c.mountFlags
		// A clone of an xfs volume carries its source's filesystem UUID,
		// and xfs refuses to mount a second filesystem with a UUID already
		// mounted; the clone is mounted without the check (as TopoLVM
		// does), so that source and clone can be used side by side.
		if v.FSType == catalog.FSXfs && (v.SourceSnapshot != "" || v.SourceVolume != "") && !slices.Contains(sr.MountOptions, "nouuid") {
			sr.MountOptions = append(slices.Clone(sr.MountOptions), "nouuid")
		}
		sr.OnlineDiscard = v.Discard == catalog.DiscardOnline
	}
	if err := d.cfg.Node.Stage(ctx, sr); err != nil {
		return nil, err
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

func (s *nodeServer) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if _, err := volumeAt(req.GetVolumeId(), "staging_target_path", req.GetStagingTargetPath(), s.d.mountPath); errors.Is(err, catalog.ErrNotFound) {
		return &csi.NodeUnstageVolumeResponse{}, nil // never a volume of ours: nothing staged
	} else if err != nil {
		return nil, err
	}
	if err := s.d.cfg.Node.Unstage(ctx, req.GetVolumeId(), req.GetStagingTargetPath()); err != nil {
		return nil, err
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (s *nodeServer) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	d := s.d
	if err := required("volume_id", req.GetVolumeId(), "target_path", req.GetTargetPath()); err != nil {
		return nil, err
	}
	if req.GetVolumeCapability() == nil {
		return nil, fmt.Errorf("volume_capability is required: %w", catalog.ErrInvalid)
	}
	if req.GetStagingTargetPath() == "" {
		return nil, fmt.Errorf("staging_target_path is required (the driver stages volumes): %w", catalog.ErrInvalid)
	}
	if _, err := volumeID("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if err := d.mountPath("staging_target_path", req.GetStagingTargetPath()); err != nil {
		return nil, err
	}
	if err := d.mountPath("target_path", req.GetTargetPath()); err != nil {
		return nil, err
	}
	if req.GetTargetPath() == req.GetStagingTargetPath() {
		return nil, fmt.Errorf("target_path and staging_target_path are both %s: %w", req.GetTargetPath(), catalog.ErrInvalid)
	}
	c, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	v, err := d.nodeVolume(ctx, req.GetVolumeId(), c, req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	pr := PublishRequest{
		VolumeID: v.ID, StagingPath: req.GetStagingTargetPath(), TargetPath: req.GetTargetPath(), Block: c.block,
		ReadOnly:     req.GetReadonly() || c.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		SingleWriter: c.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		MountOptions: c.mountFlags,
	}
	if err := d.cfg.Node.Publish(ctx, pr); err != nil {
		return nil, err
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (s *nodeServer) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if _, err := volumeAt(req.GetVolumeId(), "target_path", req.GetTargetPath(), s.d.mountPath); errors.Is(err, catalog.ErrNotFound) {
		return &csi.NodeUnpublishVolumeResponse{}, nil // never a volume of ours: nothing published
	} else if err != nil {
		return nil, err
	}
	if err := s.d.cfg.Node.Unpublish(ctx, req.GetVolumeId(), req.GetTargetPath()); err != nil {
		return nil, err
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (s *nodeServer) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if _, err := volumeAt(req.GetVolumeId(), "volume_path", req.GetVolumePath(), s.d.lookupPath); err != nil {
		return nil, err
	}
	if p := req.GetStagingTargetPath(); p != "" {
		if err := s.d.lookupPath("staging_target_path", p); err != nil {
			return nil, err
		}
	}
	st, err := s.d.cfg.Node.Stats(ctx, req.GetVolumeId(), req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	out := &csi.NodeGetVolumeStatsResponse{}
	bytes := &csi.VolumeUsage{Unit: csi.VolumeUsage_BYTES, Total: max(st.TotalBytes, 0)}
	if !st.Block {
		bytes.Used, bytes.Available = max(st.UsedBytes, 0), max(st.AvailableBytes, 0)
	}
	out.Usage = append(out.Usage, bytes)
	if !st.Block && st.TotalInodes > 0 {
		out.Usage = append(out.Usage, &csi.VolumeUsage{Unit: csi.VolumeUsage_INODES,
			Total: st.TotalInodes, Used: max(st.UsedInodes, 0), Available: max(st.FreeInodes, 0)})
	}
	setCondition(out, st.Condition)
	return out, nil
}

func (s *nodeServer) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	typ, err := volumeAt(req.GetVolumeId(), "volume_path", req.GetVolumePath(), s.d.lookupPath)
	if err != nil {
		return nil, err
	}
	if p := req.GetStagingTargetPath(); p != "" {
		if err := s.d.lookupPath("staging_target_path", p); err != nil {
			return nil, err
		}
	}
	if cr := req.GetCapacityRange(); cr != nil {
		if err := rangeShape("capacity_range", cr); err != nil {
			return nil, err
		}
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
	v, err := s.d.cfg.Catalog.GetVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	// The controller has grown the stack (or the quota) and recorded the
	// size: that is the size the device gets.
	if cr := req.GetCapacityRange(); cr != nil {
		if cr.GetRequiredBytes() > v.Size {
			return nil, fmt.Errorf("volume %s has %d bytes, %d are asked for; ControllerExpandVolume must grow it first: %w",
				v.ID, v.Size, cr.GetRequiredBytes(), catalog.ErrOutOfRange)
		}
		if l := cr.GetLimitBytes(); l > 0 && l < v.Size {
			return nil, fmt.Errorf("volume %s already has %d bytes, above the limit of %d: %w", v.ID, v.Size, l, catalog.ErrOutOfRange)
		}
	}
	if v.Type == catalog.Simfs {
		return &csi.NodeExpandVolumeResponse{CapacityBytes: v.Size}, nil // the quota is the size
	}
	size, err := s.d.cfg.Node.Expand(ctx, v.ID, v.Size, req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}
