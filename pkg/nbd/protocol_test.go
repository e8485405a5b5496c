package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// rawClient drives the protocol by hand so tests can send what real
// clients never would.
type rawClient struct {
	t    *testing.T
	c    net.Conn
	done chan error // ServeConn's result
}

func newRawClient(t *testing.T, exports ...Export) *rawClient {
	t.Helper()
	srv, err := NewServer(exports...)
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	return startRawClient(t, srv, a, b)
}

// startRawClient serves b with srv and reads the greeting on a.
func startRawClient(t *testing.T, srv *Server, a, b net.Conn) *rawClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	rc := &rawClient{t: t, c: a, done: make(chan error, 1)}
	go func() { rc.done <- srv.ServeConn(ctx, b) }()
	t.Cleanup(func() { cancel(); a.Close(); <-rc.done })
	a.SetDeadline(time.Now().Add(20 * time.Second))
	var hello [18]byte
	rc.read(hello[:])
	if binary.BigEndian.Uint64(hello[:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != optMagic {
		t.Fatalf("bad greeting % x", hello)
	}
	rc.write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes))
	return rc
}

func (rc *rawClient) read(p []byte) {
	rc.t.Helper()
	if _, err := io.ReadFull(rc.c, p); err != nil {
		rc.t.Fatalf("read from server: %v", err)
	}
}

func (rc *rawClient) write(p []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(p); err != nil {
		rc.t.Fatalf("write to server: %v", err)
	}
}

// option sends an option and returns the reply types and payloads up to
// and including the first non-INFO/SERVER/META_CONTEXT reply.
func (rc *rawClient) option(opt uint32, data []byte) (types []uint32, payloads [][]byte) {
	rc.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	rc.write(append(b, data...))
	for {
		var h [20]byte
		rc.read(h[:])
		if binary.BigEndian.Uint64(h[:]) != optReplyMagic || binary.BigEndian.Uint32(h[8:]) != opt {
			rc.t.Fatalf("bad option reply header % x", h)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		p := make([]byte, binary.BigEndian.Uint32(h[16:]))
		rc.read(p)
		types, payloads = append(types, typ), append(payloads, p)
		if typ != repInfo && typ != repServer && typ != repMetaContext {
			return
		}
	}
}

func goData(name string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	return binary.BigEndian.AppendUint16(b, 0)
}

func (rc *rawClient) goExport(name string) {
	rc.t.Helper()
	types, _ := rc.option(optGo, goData(name))
	if types[len(types)-1] != repAck {
		rc.t.Fatalf("OPT_GO replies %v", types)
	}
}

func (rc *rawClient) request(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	rc.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	rc.write(append(b, payload...))
}

// simpleReply reads a simple reply and returns its handle and error.
func (rc *rawClient) simpleReply() (handle uint64, errno uint32) {
	rc.t.Helper()
	var h [16]byte
	rc.read(h[:])
	if binary.BigEndian.Uint32(h[:]) != simpleMagic {
		rc.t.Fatalf("not a simple reply: % x", h)
	}
	return binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[4:])
}

// expectClosed checks that the server closed the connection and that
// ServeConn returned an error wrapping errMalformed.
func (rc *rawClient) expectClosed() {
	rc.t.Helper()
	if _, err := rc.c.Read(make([]byte, 1)); err == nil {
		rc.t.Fatalf("connection still open")
	}
	select {
	case err := <-rc.done:
		if !errors.Is(err, errMalformed) {
			rc.t.Errorf("ServeConn returned %v, want a malformed-input error", err)
		}
		rc.done <- err // for Cleanup
	case <-time.After(10 * time.Second):
		rc.t.Fatal("ServeConn did not return")
	}
}

func TestProtocolErrors(t *testing.T) {
	const size = 1 << 20
	tests := []struct {
		name     string
		readOnly bool
		typ      uint16
		flags    uint16
		off      uint64
		length   uint32
		payload  bool
		want     uint32
	}{
		{name: "read ok", typ: cmdRead, off: 0, length: 4096, want: 0},
		{name: "read past end", typ: cmdRead, off: size - 512, length: 4096, want: errInval},
		{name: "read offset overflow", typ: cmdRead, off: 1<<64 - 512, length: 4096, want: errInval},
		{name: "read too long", typ: cmdRead, off: 0, length: MaxPayload + 1, want: errInval},
		{name: "write past end", typ: cmdWrite, off: size, length: 512, payload: true, want: errNoSpc},
		{name: "trim past end", typ: cmdTrim, off: size, length: 512, want: errInval},
		{name: "zero past end", typ: cmdWriteZeroes, off: size - 1, length: 2, want: errNoSpc},
		{name: "unknown command", typ: 42, off: 0, length: 512, want: errInval},
		{name: "unknown flag", typ: cmdFlush, flags: 1 << 9, want: errInval},
		{name: "block status without context", typ: cmdBlockStatus, length: 512, want: errInval},
		{name: "fast zero keeping allocation", typ: cmdWriteZeroes, flags: cmdFlagNoHole | cmdFlagFastZero, length: 512, want: errNotSup},
		{name: "read-only write", readOnly: true, typ: cmdWrite, length: 512, payload: true, want: errPerm},
		{name: "read-only trim", readOnly: true, typ: cmdTrim, length: 512, want: errPerm},
		{name: "read-only zero", readOnly: true, typ: cmdWriteZeroes, length: 512, want: errPerm},
		{name: "read-only flush", readOnly: true, typ: cmdFlush, want: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := newFileBackend(t, size)
			rc := newRawClient(t, Export{Name: "e", Backend: b, ReadOnly: tc.readOnly})
			rc.goExport("e")
			var payload []byte
			if tc.payload {
				payload = make([]byte, tc.length)
			}
			rc.request(tc.typ, tc.flags, 7, tc.off, tc.length, payload)
			handle, errno := rc.simpleReply()
			if handle != 7 || errno != tc.want {
				t.Fatalf("reply handle %d error %d, want handle 7 error %d", handle, errno, tc.want)
			}
			if errno == 0 && tc.typ == cmdRead {
				rc.read(make([]byte, tc.length))
			}
			// The connection stays usable after an error reply.
			rc.request(cmdFlush, 0, 8, 0, 0, nil)
			if h, e := rc.simpleReply(); h != 8 || e != 0 {
				t.Fatalf("flush after error: handle %d error %d", h, e)
			}
			rc.request(cmdDisc, 0, 9, 0, 0, nil)
		})
	}
}

func TestMalformedInputClosesConnection(t *testing.T) {
	tests := []struct {
		name string
		send func(rc *rawClient)
	}{
		{"garbage request magic", func(rc *rawClient) {
			rc.goExport("")
			rc.write(bytes.Repeat([]byte{0xde, 0xad}, 14))
		}},
		{"oversized write", func(rc *rawClient) {
			rc.goExport("")
			rc.request(cmdWrite, 0, 1, 0, MaxPayload+1, nil)
		}},
		{"garbage option magic", func(rc *rawClient) {
			rc.write(bytes.Repeat([]byte{0x42}, 16))
		}},
		{"unknown export by name", func(rc *rawClient) {
			b := binary.BigEndian.AppendUint64(nil, optMagic)
			b = binary.BigEndian.AppendUint32(b, optExportName)
			b = binary.BigEndian.AppendUint32(b, 3)
			rc.write(append(b, "nop"...))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := newFileBackend(t, 1<<20)
			rc := newRawClient(t, Export{Name: "e", Backend: b})
			tc.send(rc)
			if tc.name == "unknown export by name" {
				// Not malformed, just refused: only the close is checked.
				if _, err := rc.c.Read(make([]byte, 1)); err == nil {
					t.Fatal("connection still open")
				}
				return
			}
			rc.expectClosed()
		})
	}
}

func TestOptions(t *testing.T) {
	b, _ := newFileBackend(t, 1<<20)
	rc := newRawClient(t, Export{Name: "e", Description: "d", Backend: b})
	if types, _ := rc.option(99, nil); len(types) != 1 || types[0] != repErrUnsup {
		t.Errorf("unknown option: replies %v, want UNSUP", types)
	}
	if types, _ := rc.option(optStartTLS, nil); types[0] != repErrUnsup {
		t.Errorf("STARTTLS: replies %v, want UNSUP", types)
	}
	if types, _ := rc.option(optList, []byte("x")); types[0] != repErrInvalid {
		t.Errorf("LIST with data: %v, want INVALID", types)
	}
	if types, _ := rc.option(optInfo, goData("nope")); types[0] != repErrUnknown {
		t.Errorf("INFO for unknown export: %v, want UNKNOWN", types)
	}
	if types, _ := rc.option(optInfo, []byte{0, 0, 0, 9}); types[0] != repErrInvalid {
		t.Errorf("INFO truncated: %v, want INVALID", types)
	}
	meta := func(queries ...string) []byte {
		b := binary.BigEndian.AppendUint32(nil, 1)
		b = append(b, 'e')
		b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
		for _, q := range queries {
			b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
			b = append(b, q...)
		}
		return b
	}
	if types, _ := rc.option(optSetMetaContext, meta(metaContextAllocation)); types[0] != repErrInvalid {
		t.Errorf("SET_META_CONTEXT before STRUCTURED_REPLY: %v, want INVALID", types)
	}
	if types, _ := rc.option(optStructuredReply, nil); types[0] != repAck {
		t.Fatalf("STRUCTURED_REPLY: %v", types)
	}
	types, payloads := rc.option(optSetMetaContext, meta("qemu:dirty-bitmap:x", metaContextAllocation))
	if len(types) != 2 || types[0] != repMetaContext || string(payloads[0][4:]) != metaContextAllocation {
		t.Fatalf("SET_META_CONTEXT: %v %q", types, payloads)
	}
	// Info with NAME and DESCRIPTION requested.
	d := binary.BigEndian.AppendUint32(nil, 1)
	d = append(d, 'e')
	d = binary.BigEndian.AppendUint16(d, 2)
	d = binary.BigEndian.AppendUint16(d, infoName)
	d = binary.BigEndian.AppendUint16(d, infoDescription)
	types, payloads = rc.option(optGo, d)
	got := map[uint16]string{}
	for i, typ := range types {
		if typ == repInfo {
			got[binary.BigEndian.Uint16(payloads[i])] = string(payloads[i][2:])
		}
	}
	if got[infoName] != "e" || got[infoDescription] != "d" || len(got[infoExport]) != 10 || types[len(types)-1] != repAck {
		t.Fatalf("GO replies %v %v", types, got)
	}
	// Block status over a written and an unwritten range, then REQ_ONE.
	if _, err := b.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	for _, flags := range []uint16{0, cmdFlagReqOne} {
		rc.request(cmdBlockStatus, flags, 5, 0, 1<<20, nil)
		var h [20]byte
		rc.read(h[:])
		p := make([]byte, binary.BigEndian.Uint32(h[16:]))
		rc.read(p)
		if binary.BigEndian.Uint16(h[6:]) != replyTypeBlockStat || binary.BigEndian.Uint16(h[4:]) != replyFlagDone {
			t.Fatalf("block status reply header % x", h)
		}
		n := (len(p) - 4) / 8
		if flags == cmdFlagReqOne && n != 1 || flags == 0 && n != 2 {
			t.Errorf("flags %d: %d extents: % x", flags, n, p)
		}
		if st := binary.BigEndian.Uint32(p[8:]); st != 0 {
			t.Errorf("first extent status %d, want data", st)
		}
	}
	// With structured replies even an early READ error is structured.
	rc.request(cmdRead, 1<<12, 9, 0, 512, nil)
	{
		var h [20]byte
		rc.read(h[:])
		p := make([]byte, binary.BigEndian.Uint32(h[16:]))
		rc.read(p)
		if binary.BigEndian.Uint32(h[:]) != structuredMagc || binary.BigEndian.Uint16(h[6:]) != replyTypeError ||
			binary.BigEndian.Uint32(p) != errInval {
			t.Fatalf("READ with a bad flag: reply % x % x, want a structured EINVAL", h, p)
		}
	}
	// Structured read of [0, 8K): one data chunk then one hole chunk.
	rc.request(cmdRead, 0, 6, 0, 8192, nil)
	var kinds []uint16
	for {
		var h [20]byte
		rc.read(h[:])
		rc.read(make([]byte, binary.BigEndian.Uint32(h[16:])))
		kinds = append(kinds, binary.BigEndian.Uint16(h[6:]))
		if binary.BigEndian.Uint16(h[4:])&replyFlagDone != 0 {
			break
		}
	}
	if len(kinds) != 2 || kinds[0] != replyTypeData || kinds[1] != replyTypeHole {
		t.Errorf("structured read chunks %v, want [data hole]", kinds)
	}
}
