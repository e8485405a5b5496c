package driver

import (
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// CSI spec 1.13 (the version csi-test v5.6.0 requires, so the one this
// module builds against) removed the alpha VolumeCondition message and the
// VOLUME_CONDITION capabilities, replacing them with a VolumeHealth API that
// no released CO uses yet. Kubernetes' kubelet (NodeGetVolumeStats) and
// external-health-monitor (ListVolumes, ControllerGetVolume) read
// VolumeCondition, as spec 1.12 defines it:
//
//	message VolumeCondition { bool abnormal = 1; string message = 2; }
//
// in field 2 of NodeGetVolumeStatsResponse and of the VolumeStatus messages
// of ListVolumesResponse and ControllerGetVolumeResponse, and the
// capability values 11 (controller) and 4 (node), which 1.13 keeps
// reserved for exactly this. The driver claims those capabilities and
// writes the field as an unknown field of the 1.13 messages, so that it
// reaches such COs on the wire byte for byte as a 1.12 plugin would send it;
// a 1.13 CO ignores it.
const (
	controllerVolumeCondition csi.ControllerServiceCapability_RPC_Type = 11
	nodeVolumeCondition       csi.NodeServiceCapability_RPC_Type       = 4
	volumeConditionField      protowire.Number                         = 2
)

// setCondition adds c as the VolumeCondition field 2 of m.
func setCondition(m proto.Message, c Condition) {
	var inner []byte
	if c.Abnormal {
		inner = protowire.AppendTag(inner, 1, protowire.VarintType)
		inner = protowire.AppendVarint(inner, 1)
	}
	if c.Message != "" {
		inner = protowire.AppendTag(inner, 2, protowire.BytesType)
		inner = protowire.AppendString(inner, c.Message)
	}
	r := m.ProtoReflect()
	raw := append([]byte(nil), r.GetUnknown()...)
	raw = protowire.AppendTag(raw, volumeConditionField, protowire.BytesType)
	raw = protowire.AppendBytes(raw, inner)
	r.SetUnknown(raw)
}
