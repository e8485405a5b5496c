package ublk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"
)

var le = binary.LittleEndian

// opReadFile and opWriteFile are IORING_OP_READ and IORING_OP_WRITE: a
// queue's ring waits for its eventfd with the one, and does the I/O a
// FileMapper places with both.
const (
	opReadFile  = 22
	opWriteFile = 23
)

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// ublk's ABI (include/uapi/linux/ublk_cmd.h), commands in their ioctl
// encoding, which every kernel with ublk accepts.
const (
	cmdGetDevInfo       = 0x02
	cmdAddDev           = 0x04
	cmdDelDev           = 0x05
	cmdStartDev         = 0x06
	cmdStopDev          = 0x07
	cmdSetParams        = 0x08
	cmdStartUserRecover = 0x10
	cmdEndUserRecover   = 0x11
	cmdGetFeatures      = 0x13

	ioFetchReq       = 0x20
	ioCommitAndFetch = 0x21

	ctrlCmdSize = 32
	devInfoSize = 64
	ioCmdSize   = 16
	ioDescSize  = 24

	maxQueueDepth = 4096

	// FlagUserRecovery and FlagUserRecoveryReissue keep a device whose
	// server died quiesced until a new server takes it over; with
	// reissue the requests in flight at the death are handed to it again.
	FlagUserRecovery        = 1 << 3
	FlagUserRecoveryReissue = 1 << 4
	flagCmdIoctlEncode      = 1 << 6
	// FlagUpdateSize says the kernel can change a live device's size
	// (UBLK_U_CMD_UPDATE_SIZE): without it, as in 6.12, a device keeps
	// the size it started with.
	FlagUpdateSize = 1 << 10

	// Device states (ublksrv_ctrl_dev_info.state).
	StateDead     = 0
	StateLive     = 1
	StateQuiesced = 2

	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1

	attrReadOnly      = 1 << 0
	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3

	// The operation is op_flags' low byte; flags are above it.
	opRead        = 0
	opWrite       = 1
	opFlush       = 2
	opDiscard     = 3
	opWriteZeroes = 5
	ioFlagFUA     = 1 << 13
	ioFlagNoUnmap = 1 << 15

	// A fetch completes with 0 when a request is there, -ENODEV when the
	// queue is being torn down.
	ioResOK    = 0
	ioResAbort = -19
)

// iowr is _IOWR('u', nr, size), ior _IOR('u', nr, size). The kernel
// tells most commands apart by nr alone, but compares GET_FEATURES whole.
func iowr(nr, size uint32) uint32 { return 3<<30 | size<<16 | 'u'<<8 | nr }
func ior(nr, size uint32) uint32  { return 2<<30 | size<<16 | 'u'<<8 | nr }

// ctrlCmd is struct ublksrv_ctrl_cmd.
type ctrlCmd struct {
	devID   uint32
	queueID uint16
	len     uint16
	addr    uint64
	data    uint64
}

func (c ctrlCmd) encode() []byte {
	b := make([]byte, ctrlCmdSize)
	le.PutUint32(b[0:], c.devID)
	le.PutUint16(b[4:], c.queueID)
	le.PutUint16(b[6:], c.len)
	le.PutUint64(b[8:], c.addr)
	le.PutUint64(b[16:], c.data)
	return b
}

// DevInfo is struct ublksrv_ctrl_dev_info: what the kernel knows of a
// device.
type DevInfo struct {
	Queues     uint16
	Depth      uint16
	State      uint16
	MaxIOBytes uint32
	ID         uint32
	ServerPID  int32
	Flags      uint64
	// ServerData is ublksrv_flags, which the kernel keeps for the server
	// and never reads.
	ServerData uint64
}

func (d DevInfo) encode() []byte {
	b := make([]byte, devInfoSize)
	le.PutUint16(b[0:], d.Queues)
	le.PutUint16(b[2:], d.Depth)
	le.PutUint16(b[4:], d.State)
	le.PutUint32(b[8:], d.MaxIOBytes)
	le.PutUint32(b[12:], d.ID)
	le.PutUint32(b[16:], uint32(d.ServerPID))
	le.PutUint64(b[24:], d.Flags)
	le.PutUint64(b[32:], d.ServerData)
	return b
}

func decodeDevInfo(b []byte) (DevInfo, error) {
	if len(b) < devInfoSize {
		return DevInfo{}, fmt.Errorf("ublk device info: %d bytes, want %d", len(b), devInfoSize)
	}
	d := DevInfo{
		Queues:     le.Uint16(b[0:]),
		Depth:      le.Uint16(b[2:]),
		State:      le.Uint16(b[4:]),
		MaxIOBytes: le.Uint32(b[8:]),
		ID:         le.Uint32(b[12:]),
		ServerPID:  int32(le.Uint32(b[16:])),
		Flags:      le.Uint64(b[24:]),
		ServerData: le.Uint64(b[32:]),
	}
	if d.Queues == 0 || d.Depth == 0 || d.Depth > maxQueueDepth {
		return d, fmt.Errorf("ublk device info: %d queues of depth %d", d.Queues, d.Depth)
	}
	return d, nil
}

// params is struct ublk_params with its basic and discard parts.
type params struct {
	attrs         uint32
	logicalShift  uint8
	physicalShift uint8
	maxSectors    uint32
	devSectors    uint64
	// Discard and write-zeroes limits; zero leaves them unsupported.
	discardGranularity uint32
	maxDiscardSectors  uint32
	maxZeroesSectors   uint32
}

const paramsLen = 8 + 32 + 20

func (p params) encode() []byte {
	b := make([]byte, paramsLen)
	le.PutUint32(b[0:], paramsLen)
	types := uint32(paramTypeBasic)
	le.PutUint32(b[8:], p.attrs)
	b[12] = p.logicalShift
	b[13] = p.physicalShift
	b[14] = p.physicalShift // io_opt
	b[15] = p.logicalShift  // io_min
	le.PutUint32(b[16:], p.maxSectors)
	le.PutUint64(b[24:], p.devSectors)
	if p.maxDiscardSectors != 0 || p.maxZeroesSectors != 0 {
		types |= paramTypeDiscard
		le.PutUint32(b[44:], p.discardGranularity)
		le.PutUint32(b[48:], p.maxDiscardSectors)
		le.PutUint32(b[52:], p.maxZeroesSectors)
		le.PutUint16(b[56:], 1) // max_discard_segments
	}
	le.PutUint32(b[4:], types)
	return b
}

// ioDesc is struct ublksrv_io_desc: one request, as the kernel posts it
// in the queue's shared descriptor array.
type ioDesc struct {
	op      uint8
	flags   uint32
	sectors uint32
	start   uint64
}

var errBadDesc = errors.New("ublk: malformed request")

// decodeIODesc reads a descriptor and checks that it describes a range of
// a device of devSectors sectors that fits in a buffer of maxBytes.
func decodeIODesc(b []byte, devSectors uint64, maxBytes int) (ioDesc, error) {
	if len(b) < ioDescSize {
		return ioDesc{}, errBadDesc
	}
	of := le.Uint32(b[0:])
	d := ioDesc{op: uint8(of), flags: of &^ 0xff, sectors: le.Uint32(b[4:]), start: le.Uint64(b[8:])}
	if d.op == opFlush {
		return d, nil // a flush's start sector is meaningless (the block layer leaves it at -1)
	}
	if d.start > devSectors || uint64(d.sectors) > devSectors-d.start {
		return d, fmt.Errorf("%w: sectors %d+%d beyond the device's %d", errBadDesc, d.start, d.sectors, devSectors)
	}
	if (d.op == opRead || d.op == opWrite) && int64(d.sectors)<<9 > int64(maxBytes) {
		return d, fmt.Errorf("%w: %d sectors exceed the %d-byte buffer", errBadDesc, d.sectors, maxBytes)
	}
	return d, nil
}

// putIOCmd writes struct ublksrv_io_cmd into b.
func putIOCmd(b []byte, q, tag uint16, result int32, addr uint64) {
	le.PutUint16(b[0:], q)
	le.PutUint16(b[2:], tag)
	le.PutUint32(b[4:], uint32(result))
	le.PutUint64(b[8:], addr)
}
