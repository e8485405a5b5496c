package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants of the NBD protocol (fixed-newstyle negotiation,
// simple and structured replies). Names follow the protocol document.
const (
	nbdMagic       = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic       = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic  = 0x3e889045565a9
	requestMagic   = 0x25609513
	simpleMagic    = 0x67446698
	structuredMagc = 0x668e33ef

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// Options.
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10

	// Option replies.
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrTooBig   = 1<<31 + 9

	// Info types for OPT_INFO / OPT_GO.
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	// Transmission flags.
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8
	tflagSendFastZero    = 1 << 11

	// Commands.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// Command flags.
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	// Structured reply chunk types and flags.
	replyFlagDone      = 1 << 0
	replyTypeNone      = 0
	replyTypeData      = 1
	replyTypeHole      = 2
	replyTypeBlockStat = 5
	replyTypeError     = 1<<15 + 1

	// base:allocation status bits.
	stateHole = 1 << 0
	stateZero = 1 << 1

	// Error values carried in replies.
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

const (
	// metaContextAllocation is the only metadata context we serve; its id
	// is fixed because there is one per export.
	metaContextAllocation   = "base:allocation"
	metaContextAllocationID = 1

	// MaxPayload bounds a READ or WRITE request. Larger requests are
	// refused (READ) or end the connection (WRITE, because its payload
	// cannot be skipped safely). 32 MiB matches what qemu and the kernel send.
	MaxPayload = 32 << 20
	// maxOptionLen bounds an option's data during negotiation.
	maxOptionLen = 64 << 10
	// maxNameLen bounds export names and metadata context queries, as the
	// protocol's 4096-byte string limit.
	maxNameLen = 4096
	// requestSize is the length of a request header on the wire.
	requestSize = 28
)

// errMalformed marks protocol violations after which the connection
// cannot be trusted and is closed.
var errMalformed = errors.New("malformed NBD message")

// request is one decoded transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

// parseRequest decodes a 28-byte request header. Only the magic is
// checked here; the meaning of flags and ranges is judged per command.
func parseRequest(b []byte) (request, error) {
	if len(b) != requestSize {
		return request{}, fmt.Errorf("request header of %d bytes: %w", len(b), errMalformed)
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != requestMagic {
		return request{}, fmt.Errorf("request magic %#x: %w", m, errMalformed)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		handle: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// infoRequest is the decoded data of OPT_INFO / OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest decodes "u32 name length, name, u16 count, u16 info...".
func parseInfoRequest(d []byte) (infoRequest, error) {
	name, rest, err := readString(d)
	if err != nil {
		return infoRequest{}, err
	}
	if len(rest) < 2 {
		return infoRequest{}, fmt.Errorf("info request without count: %w", errMalformed)
	}
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return infoRequest{}, fmt.Errorf("info request lists %d items in %d bytes: %w", n, len(rest), errMalformed)
	}
	r := infoRequest{name: name, infos: make([]uint16, n)}
	for i := range r.infos {
		r.infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return r, nil
}

// metaRequest is the decoded data of OPT_LIST/SET_META_CONTEXT.
type metaRequest struct {
	name    string
	queries []string
}

// parseMetaRequest decodes "u32 name length, name, u32 count, (u32 len, query)...".
func parseMetaRequest(d []byte) (metaRequest, error) {
	name, rest, err := readString(d)
	if err != nil {
		return metaRequest{}, err
	}
	if len(rest) < 4 {
		return metaRequest{}, fmt.Errorf("meta context request without count: %w", errMalformed)
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	// Every query needs at least its 4-byte length, which bounds n
	// before anything is allocated from it.
	if uint64(n)*4 > uint64(len(rest)) {
		return metaRequest{}, fmt.Errorf("meta context request lists %d queries in %d bytes: %w", n, len(rest), errMalformed)
	}
	r := metaRequest{name: name, queries: make([]string, 0, n)}
	for i := uint32(0); i < n; i++ {
		var q string
		q, rest, err = readString(rest)
		if err != nil {
			return metaRequest{}, err
		}
		r.queries = append(r.queries, q)
	}
	if len(rest) != 0 {
		return metaRequest{}, fmt.Errorf("meta context request has %d trailing bytes: %w", len(rest), errMalformed)
	}
	return r, nil
}

// readString reads a u32-length-prefixed string of at most maxNameLen bytes.
func readString(d []byte) (string, []byte, error) {
	if len(d) < 4 {
		return "", nil, fmt.Errorf("string length truncated: %w", errMalformed)
	}
	n := binary.BigEndian.Uint32(d)
	d = d[4:]
	if n > maxNameLen || uint64(n) > uint64(len(d)) {
		return "", nil, fmt.Errorf("string of %d bytes in %d: %w", n, len(d), errMalformed)
	}
	return string(d[:n]), d[n:], nil
}
