package serving

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzReadRequest: any byte stream yields a request that passes the checks
// or an error, never a panic; nothing longer than the bound is accepted;
// an accepted request encodes back to one that parses the same.
func FuzzReadRequest(f *testing.F) {
	for _, s := range []string{
		`{"op":"snapshot"}` + "\n",
		`{"op":"snapshot-delete","guid":"{5fbaabe3-6958-40ff-92a7-860e329aab41}"}` + "\n",
		`{"op":"grow","size":1048576}` + "\n",
		`{"op":"compact"}` + "\n",
		`{"op":"grow","size":-1}` + "\n",
		`{"op":"compact"} {"op":"snapshot"}` + "\n",
		`{"op":"compact","x":1}` + "\n",
		"\n",
		`{"op":"snap`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := readRequest(bytes.NewReader(b))
		if err != nil {
			if i := bytes.IndexByte(b, '\n'); i >= maxRequest && !errors.Is(err, errRequestTooLong) {
				t.Fatalf("a %d-byte line failed with %v, want errRequestTooLong", i+1, err)
			}
			return
		}
		if i := bytes.IndexByte(b, '\n'); i < 0 || i >= maxRequest {
			t.Fatalf("accepted a request without a newline within %d bytes", maxRequest)
		}
		again, err := parseRequest(mustJSON(t, req))
		if err != nil || again != req {
			t.Fatalf("request %+v does not round-trip: %+v, %v", req, again, err)
		}
	})
}
