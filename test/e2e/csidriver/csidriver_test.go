package csidriver

import (
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/encoding/protowire"
)

// legacyCondition encodes VolumeCondition as CSI 1.12 does, in field 2.
func legacyCondition(abnormal bool, msg string) []byte {
	var inner []byte
	if abnormal {
		inner = protowire.AppendTag(inner, 1, protowire.VarintType)
		inner = protowire.AppendVarint(inner, 1)
	}
	if msg != "" {
		inner = protowire.AppendTag(inner, 2, protowire.BytesType)
		inner = protowire.AppendString(inner, msg)
	}
	b := protowire.AppendTag(nil, 2, protowire.BytesType)
	return protowire.AppendBytes(b, inner)
}

func TestCondition(t *testing.T) {
	other := protowire.AppendVarint(protowire.AppendTag(nil, 7, protowire.VarintType), 3)
	for _, tc := range []struct {
		name    string
		unknown []byte
		want    VolumeCondition
		ok, err bool
	}{
		{name: "none"},
		{name: "healthy", unknown: legacyCondition(false, "volume is healthy"), want: VolumeCondition{Message: "volume is healthy"}, ok: true},
		{name: "abnormal", unknown: legacyCondition(true, "dead"), want: VolumeCondition{Abnormal: true, Message: "dead"}, ok: true},
		{name: "after another field", unknown: append(other, legacyCondition(true, "x")...), want: VolumeCondition{Abnormal: true, Message: "x"}, ok: true},
		{name: "truncated", unknown: legacyCondition(true, "dead")[:4], err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &csi.NodeGetVolumeStatsResponse{}
			m.ProtoReflect().SetUnknown(tc.unknown)
			c, ok, err := Condition(m)
			if (err != nil) != tc.err || ok != tc.ok || c != tc.want {
				t.Fatalf("Condition: %+v %v %v, want %+v %v (error %v)", c, ok, err, tc.want, tc.ok, tc.err)
			}
		})
	}
}

func FuzzCondition(f *testing.F) {
	f.Add(legacyCondition(true, "dead"))
	f.Add([]byte{0x12, 0x05, 0x08})
	f.Fuzz(func(t *testing.T, b []byte) {
		m := &csi.NodeGetVolumeStatsResponse{}
		m.ProtoReflect().SetUnknown(b)
		Condition(m) // must not panic on any input
	})
}
