package catalog

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func TestParseVolumeID(t *testing.T) {
	u := newUUID()
	for _, tc := range []struct {
		id   string
		typ  Type
		want error
	}{
		{"ploop-" + u, Ploop, nil},
		{"simfs-" + u, Simfs, nil},
		{"snap-" + u, "", ErrNotFound},
		{"ploop-" + strings.ToUpper(u), "", ErrNotFound},
		{"ploop-" + u[:35], "", ErrNotFound},
		{"ploop-" + u + "x", "", ErrNotFound},
		{"reallyfakevolumeid", "", ErrNotFound},
		{"ploop-" + strings.ReplaceAll(u, "-", "_"), "", ErrNotFound},
		{"", "", ErrInvalid},
		{"../x", "", ErrInvalid},
		{"..", "", ErrInvalid},
		{".hidden", "", ErrInvalid},
		{"-flag", "", ErrInvalid},
		{"/etc/passwd", "", ErrInvalid},
		{"ploop-" + u + "/..", "", ErrInvalid},
		{"ploop-\x00" + u[1:], "", ErrInvalid},
		{"a b", "", ErrInvalid},
		{strings.Repeat("a", 4096), "", ErrInvalid},
		{"ploop-" + u + "\n", "", ErrInvalid},
	} {
		typ, err := ParseVolumeID(tc.id)
		if !errors.Is(err, tc.want) || (tc.want == nil && err != nil) || typ != tc.typ {
			t.Errorf("ParseVolumeID(%q) = %q, %v; want %q, %v", tc.id, typ, err, tc.typ, tc.want)
		}
	}
	if err := ValidateSnapshotID("snap-" + u); err != nil {
		t.Errorf("snapshot id: %v", err)
	}
	for _, bad := range []string{"ploop-" + u, "snap-" + u[:10], "snap"} {
		if err := ValidateSnapshotID(bad); !errors.Is(err, ErrNotFound) {
			t.Errorf("ValidateSnapshotID(%q) = %v, want ErrNotFound", bad, err)
		}
	}
	if err := ValidateSnapshotID("../snap-" + u); !errors.Is(err, ErrInvalid) {
		t.Errorf("hostile snapshot id: %v", err)
	}
	seen := map[string]bool{}
	for range 1000 {
		id := newVolumeID(Ploop)
		if typ, err := ParseVolumeID(id); err != nil || typ != Ploop || seen[id] {
			t.Fatalf("generated %q: %v (seen %v)", id, err, seen[id])
		}
		seen[id] = true
	}
}

func TestToken(t *testing.T) {
	id := newVolumeID(Simfs)
	tok := makeToken(volumeTokenKind, id)
	if got, err := parseToken(volumeTokenKind, tok); err != nil || got != id {
		t.Fatalf("round trip: %q, %v", got, err)
	}
	for _, bad := range []string{
		"garbage!", tok + "x", makeToken(snapshotTokenKind, newSnapshotID()), makeToken(volumeTokenKind, "../x"),
		makeToken(volumeTokenKind, newSnapshotID()), strings.Repeat("A", 10000),
	} {
		if _, err := parseToken(volumeTokenKind, bad); !errors.Is(err, ErrBadToken) {
			t.Errorf("token %q: %v, want ErrBadToken", bad, err)
		}
	}
}

// FuzzParseID: no input panics, and whatever is accepted is safe as a path
// component and of the right shape.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{"ploop-" + newUUID(), "simfs-" + newUUID(), "snap-" + newUUID(), "../x", "", "a\x00b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		typ, err := ParseVolumeID(id)
		serr := ValidateSnapshotID(id)
		for _, e := range []error{err, serr} {
			if e != nil && !errors.Is(e, ErrInvalid) && !errors.Is(e, ErrNotFound) {
				t.Fatalf("%q: unclassified error %v", id, e)
			}
		}
		if err == nil && serr == nil {
			t.Fatalf("%q is both a volume and a snapshot id", id)
		}
		if err == nil || serr == nil {
			if strings.ContainsAny(id, "/\x00") || strings.Contains(id, "..") || len(id) > MaxIDLength {
				t.Fatalf("%q accepted", id)
			}
		}
		if err == nil && typ != Ploop && typ != Simfs {
			t.Fatalf("%q: type %q", id, typ)
		}
	})
}

// FuzzToken: tokens never panic and accepted ones name a valid id.
func FuzzToken(f *testing.F) {
	f.Add(makeToken(volumeTokenKind, newVolumeID(Ploop)))
	f.Add(makeToken(snapshotTokenKind, newSnapshotID()))
	f.Add("!!")
	f.Fuzz(func(t *testing.T, tok string) {
		for _, kind := range []string{volumeTokenKind, snapshotTokenKind} {
			id, err := parseToken(kind, tok)
			if err != nil {
				if !errors.Is(err, ErrBadToken) {
					t.Fatalf("%q: unclassified error %v", tok, err)
				}
				continue
			}
			if tok != "" && checkSafe("token", id) != nil {
				t.Fatalf("%q gave unsafe id %q", tok, id)
			}
		}
	})
}

func TestRecordRoundTrip(t *testing.T) {
	v := &volumeRecord{Version: recordVersion, ID: newVolumeID(Ploop), Name: "pvc-ü", State: stateReady, Type: Ploop,
		Size: 64 * mib, FSType: FSXfs, ClusterSize: mib, SourceSnapshot: newSnapshotID(), PendingMerges: []string{ploop.NewGUID()},
		Created: time.Unix(1700000000, 0).UTC()}
	b, _ := json.Marshal(v)
	got, err := parseVolumeRecord(b, v.ID)
	if err != nil || got.Name != v.Name || got.SourceSnapshot != v.SourceSnapshot || !got.Created.Equal(v.Created) {
		t.Fatalf("volume record: %+v, %v", got, err)
	}
	if _, err := parseVolumeRecord(b, newVolumeID(Ploop)); err == nil {
		t.Fatal("a record in another id's file was accepted")
	}
	for _, bad := range []string{
		`{}`, `{"version":1}`, string(b) + `{}`, strings.Replace(string(b), `"ploop"`, `"simfs"`, 1),
		strings.Replace(string(b), `"ready"`, `"odd"`, 1), strings.Replace(string(b), `"version":1`, `"version":2`, 1),
		strings.Replace(string(b), `{`, `{"extra":1,`, 1), strings.Replace(string(b), `"pendingMerges":["{`, `"pendingMerges":["../{`, 1),
	} {
		if _, err := parseVolumeRecord([]byte(bad), ""); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
	s := &snapshotRecord{Version: recordVersion, ID: newSnapshotID(), Name: "snap", State: stateCreating, Type: Simfs,
		SourceVolume: newVolumeID(Simfs), Size: 4096}
	b, _ = json.Marshal(s)
	if got, err := parseSnapshotRecord(b, s.ID); err != nil || *got != *s {
		t.Fatalf("snapshot record: %+v, %v", got, err)
	}
}

// FuzzRecord: the record parsers never panic, and what they accept has
// ids that are safe as path components.
func FuzzRecord(f *testing.F) {
	v, _ := json.Marshal(&volumeRecord{Version: 1, ID: newVolumeID(Ploop), Name: "n", State: stateReady, Type: Ploop, Size: mib})
	s, _ := json.Marshal(&snapshotRecord{Version: 1, ID: newSnapshotID(), Name: "n", State: stateReady, Type: Ploop,
		SourceVolume: newVolumeID(Ploop), Size: mib})
	f.Add(v)
	f.Add(s)
	f.Add([]byte(`{"version":1,"id":"../x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := parseVolumeRecord(b, ""); err == nil {
			if _, err := ParseVolumeID(r.ID); err != nil {
				t.Fatalf("accepted volume id %q", r.ID)
			}
		}
		if r, err := parseSnapshotRecord(b, ""); err == nil {
			if ValidateSnapshotID(r.ID) != nil {
				t.Fatalf("accepted snapshot id %q", r.ID)
			}
		}
	})
}
