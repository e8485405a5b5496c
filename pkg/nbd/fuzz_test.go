package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// memBackend is an in-memory Backend for fuzzing; the first half of it
// counts as allocated.
type memBackend struct {
	mu   sync.Mutex
	data []byte
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }
func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}
func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}
func (m *memBackend) Flush() error { return nil }
func (m *memBackend) Discard(off, length int64) error {
	return m.WriteZeroes(off, length, false)
}
func (m *memBackend) WriteZeroes(off, length int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}
func (m *memBackend) Extent(off, length int64) (int64, bool, error) {
	half := int64(len(m.data) / 2)
	if off < half {
		return min(half-off, length), true, nil
	}
	return length, false, nil
}
func (m *memBackend) ReadOnly() bool { return false }

// clientStream builds a byte stream a client could send: flags, options,
// then requests.
func clientStream(opts [][]byte, reqs [][]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	for _, o := range opts {
		b = append(b, o...)
	}
	for _, r := range reqs {
		b = append(b, r...)
	}
	return b
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 1)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

// FuzzServeConn feeds arbitrary client streams through the handshake and
// the request parser: the server must never panic or hang, whatever it is
// sent.
func FuzzServeConn(f *testing.F) {
	meta := binary.BigEndian.AppendUint32(nil, 0)
	meta = binary.BigEndian.AppendUint32(meta, 1)
	meta = binary.BigEndian.AppendUint32(meta, uint32(len(metaContextAllocation)))
	meta = append(meta, metaContextAllocation...)
	f.Add(clientStream([][]byte{
		optBytes(optStructuredReply, nil),
		optBytes(optSetMetaContext, meta),
		optBytes(optGo, goData("")),
	}, [][]byte{
		reqBytes(cmdWrite, cmdFlagFUA, 4096, 8, []byte("abcdefgh")),
		reqBytes(cmdRead, 0, 0, 65536, nil),
		reqBytes(cmdBlockStatus, 0, 0, 65536, nil),
		reqBytes(cmdWriteZeroes, cmdFlagNoHole, 0, 512, nil),
		reqBytes(cmdTrim, 0, 512, 512, nil),
		reqBytes(cmdFlush, 0, 0, 0, nil),
		reqBytes(cmdDisc, 0, 0, 0, nil),
	}))
	f.Add(clientStream([][]byte{
		optBytes(optList, nil),
		optBytes(optListMetaContext, meta),
		optBytes(optInfo, goData("x")),
		optBytes(77, []byte("junk")),
		optBytes(optExportName, nil),
	}, [][]byte{reqBytes(cmdRead, 0, 1<<19, 1<<20, nil)}))
	f.Add(clientStream([][]byte{optBytes(optAbort, nil)}, nil))
	f.Add([]byte{0, 0, 0, 3, 0x49, 0x48})

	f.Fuzz(func(t *testing.T, stream []byte) {
		srv, err := NewServer(Export{Name: "x", Backend: &memBackend{data: make([]byte, 1<<20)}})
		if err != nil {
			t.Fatal(err)
		}
		client, server := socketpair(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(ctx, server) }()
		go func() {
			// Best effort: the server may close early on bad input.
			_, _ = client.Write(stream)
			_ = client.(*net.UnixConn).CloseWrite()
		}()
		_, _ = io.Copy(io.Discard, client)
		client.Close()
		select {
		case <-done:
		case <-ctx.Done():
			t.Fatal("ServeConn did not return after the client finished")
		}
	})
}

// FuzzParseMetaRequest checks the option-data decoders directly.
func FuzzParseMetaRequest(f *testing.F) {
	f.Add(binary.BigEndian.AppendUint32([]byte{0, 0, 0, 0}, 0))
	f.Add([]byte{0, 0, 0, 1, 'e', 0xff, 0xff, 0xff, 0xff})
	f.Add(goData("export"))
	f.Fuzz(func(t *testing.T, d []byte) {
		if r, err := parseMetaRequest(d); err == nil {
			n := 8 + len(r.name)
			for _, q := range r.queries {
				n += 4 + len(q)
			}
			if n != len(d) {
				t.Fatalf("parsed %d bytes of %d", n, len(d))
			}
		}
		if r, err := parseInfoRequest(d); err == nil && 6+len(r.name)+2*len(r.infos) != len(d) {
			t.Fatalf("info request parsed %d bytes of %d", 6+len(r.name)+2*len(r.infos), len(d))
		}
	})
}

func socketpair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}
