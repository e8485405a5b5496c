package ublk

import (
	"bytes"
	"testing"
)

// The layouts are the kernel's (include/uapi/linux/ublk_cmd.h); the
// kernel test proves them against ublk_drv, these pin them and the
// decoders' checks.

func TestCommandCodes(t *testing.T) {
	for _, c := range []struct {
		name string
		got  uint32
		want uint32
	}{
		{"UBLK_U_CMD_ADD_DEV", iowr(cmdAddDev, ctrlCmdSize), 0xc0207504},
		{"UBLK_U_CMD_GET_FEATURES", ior(cmdGetFeatures, ctrlCmdSize), 0x80207513},
		{"UBLK_U_IO_FETCH_REQ", iowr(ioFetchReq, ioCmdSize), 0xc0107520},
		{"UBLK_U_IO_COMMIT_AND_FETCH_REQ", iowr(ioCommitAndFetch, ioCmdSize), 0xc0107521},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func TestDevInfoRoundTrip(t *testing.T) {
	in := DevInfo{Queues: 2, Depth: 64, State: StateLive, MaxIOBytes: 512 << 10, ID: 7, ServerPID: 1234, Flags: FlagUserRecovery, ServerData: 99}
	out, err := decodeDevInfo(in.encode())
	if err != nil || out != in {
		t.Fatalf("round trip: %+v %v, want %+v", out, err, in)
	}
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"short", make([]byte, 10)},
		{"no queues", DevInfo{Depth: 1}.encode()},
		{"too deep", DevInfo{Queues: 1, Depth: maxQueueDepth + 1}.encode()},
	} {
		if _, err := decodeDevInfo(c.b); err == nil {
			t.Errorf("%s: decoded without error", c.name)
		}
	}
}

func desc(op uint8, flags, sectors uint32, start uint64) []byte {
	b := make([]byte, ioDescSize)
	le.PutUint32(b[0:], uint32(op)|flags)
	le.PutUint32(b[4:], sectors)
	le.PutUint64(b[8:], start)
	return b
}

func TestDecodeIODesc(t *testing.T) {
	const dev, buf = 2048, 64 << 10
	for _, c := range []struct {
		name string
		b    []byte
		ok   bool
	}{
		{"read", desc(opRead, 0, 128, 0), true},
		{"write at the end", desc(opWrite, ioFlagFUA, 8, dev-8), true},
		{"flush at -1", desc(opFlush, 0, 0, ^uint64(0)), true},
		{"discard whole", desc(opDiscard, 0, dev, 0), true},
		{"beyond the end", desc(opWrite, 0, 16, dev-8), false},
		{"start beyond", desc(opRead, 0, 0, dev+1), false},
		{"wrapping", desc(opDiscard, 0, 16, ^uint64(0)-4), false},
		{"bigger than the buffer", desc(opRead, 0, 129, 0), false},
		{"short", make([]byte, 8), false},
	} {
		_, err := decodeIODesc(c.b, dev, buf)
		if (err == nil) != c.ok {
			t.Errorf("%s: err %v, want ok=%v", c.name, err, c.ok)
		}
	}
}

func TestParamsEncoding(t *testing.T) {
	b := params{logicalShift: 12, physicalShift: 12, maxSectors: 1024, devSectors: 1 << 21}.encode()
	if le.Uint32(b[0:]) != paramsLen || le.Uint32(b[4:]) != paramTypeBasic {
		t.Fatalf("header %x: want len %d, basic only", b[:8], paramsLen)
	}
	if le.Uint64(b[24:]) != 1<<21 || b[12] != 12 {
		t.Fatalf("basic %x", b[8:40])
	}
	b = params{logicalShift: 9, physicalShift: 12, maxSectors: 1024, devSectors: 8, discardGranularity: 4096, maxDiscardSectors: 8}.encode()
	if le.Uint32(b[4:]) != paramTypeBasic|paramTypeDiscard || le.Uint16(b[56:]) != 1 {
		t.Fatalf("discard %x", b)
	}
	if !bytes.Equal(ctrlCmd{devID: 1, queueID: 0xffff, len: 64, addr: 2, data: 3}.encode()[:8], []byte{1, 0, 0, 0, 0xff, 0xff, 64, 0}) {
		t.Fatal("ctrl cmd header")
	}
}

// FuzzDecode: whatever the kernel's shared memory holds, the decoders
// never panic, and an accepted request lies inside the device and buffer.
func FuzzDecode(f *testing.F) {
	f.Add(desc(opRead, 0, 8, 0), uint64(2048), DevInfo{Queues: 1, Depth: 1}.encode())
	f.Add(desc(opFlush, 0, 0, ^uint64(0)), uint64(1), make([]byte, 3))
	f.Fuzz(func(t *testing.T, d []byte, dev uint64, info []byte) {
		const buf = 64 << 10
		if r, err := decodeIODesc(d, dev, buf); err == nil && r.op != opFlush {
			if r.start+uint64(r.sectors) > dev || r.start+uint64(r.sectors) < r.start {
				t.Fatalf("accepted %+v beyond a device of %d sectors", r, dev)
			}
			if (r.op == opRead || r.op == opWrite) && uint64(r.sectors)<<9 > buf {
				t.Fatalf("accepted %+v beyond the buffer", r)
			}
		}
		if i, err := decodeDevInfo(info); err == nil && (i.Queues == 0 || i.Depth == 0) {
			t.Fatalf("accepted %+v", i)
		}
	})
}
