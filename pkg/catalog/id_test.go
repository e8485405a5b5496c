package catalog

import (
	"encoding/json"
	"errors"
	"fmt"
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
		id := NewVolumeID(Ploop)
		if typ, err := ParseVolumeID(id); err != nil || typ != Ploop || seen[id] {
			t.Fatalf("generated %q: %v (seen %v)", id, err, seen[id])
		}
		seen[id] = true
	}
}

func TestToken(t *testing.T) {
	id := NewVolumeID(Simfs)
	tok := makeToken(volumeTokenKind, id)
	if got, err := parseToken(volumeTokenKind, tok); err != nil || got != id {
		t.Fatalf("round trip: %q, %v", got, err)
	}
	for _, bad := range []string{
		"garbage!", tok + "x", makeToken(snapshotTokenKind, NewSnapshotID()), makeToken(volumeTokenKind, "../x"),
		makeToken(volumeTokenKind, NewSnapshotID()), strings.Repeat("A", 10000),
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
	f.Add(makeToken(volumeTokenKind, NewVolumeID(Ploop)))
	f.Add(makeToken(snapshotTokenKind, NewSnapshotID()))
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
	v := &volumeRecord{Version: recordVersion, ID: NewVolumeID(Ploop), Name: "pvc-ü", State: stateReady, Type: Ploop,
		Size: 64 * mib, FSType: FSXfs, ClusterSize: mib, SourceSnapshot: NewSnapshotID(), PendingMerges: []string{ploop.NewGUID()},
		Created: time.Unix(1700000000, 0).UTC()}
	b, _ := json.Marshal(v)
	got, err := parseVolumeRecord(b, v.ID)
	if err != nil || got.Name != v.Name || got.SourceSnapshot != v.SourceSnapshot || !got.Created.Equal(v.Created) {
		t.Fatalf("volume record: %+v, %v", got, err)
	}
	if _, err := parseVolumeRecord(b, NewVolumeID(Ploop)); err == nil {
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
	s := &snapshotRecord{Version: recordVersion, ID: NewSnapshotID(), Name: "snap", State: stateCreating, Type: Simfs,
		SourceVolume: NewVolumeID(Simfs), Size: 4096}
	b, _ = json.Marshal(s)
	if got, err := parseSnapshotRecord(b, s.ID); err != nil || *got != *s {
		t.Fatalf("snapshot record: %+v, %v", got, err)
	}
}

// FuzzRecord: the record parsers never panic, and what they accept has
// ids that are safe as path components.
func FuzzRecord(f *testing.F) {
	v, _ := json.Marshal(&volumeRecord{Version: 1, ID: NewVolumeID(Ploop), Name: "n", State: stateReady, Type: Ploop, Size: mib})
	s, _ := json.Marshal(&snapshotRecord{Version: 1, ID: NewSnapshotID(), Name: "n", State: stateReady, Type: Ploop,
		SourceVolume: NewVolumeID(Ploop), Size: mib})
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

// TestRequestedIDs: a cluster's controller names volumes and snapshots
// before the node creates them; the catalogue uses the id, keeps creation
// idempotent by name and id, and refuses ids that are malformed, of the
// wrong type, or taken.
func TestRequestedIDs(t *testing.T) {
	c := newFastCatalog(t, Options{})
	ctx := testCtx(t)
	vid := NewVolumeID(Ploop)
	v := mustCreate(t, c, VolumeRequest{Name: "pvc-a", ID: vid, RequiredBytes: 8 << 20})
	if v.ID != vid {
		t.Fatalf("created %s, asked for %s", v.ID, vid)
	}
	if again, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-a", ID: vid, RequiredBytes: 8 << 20}); err != nil || again.ID != vid {
		t.Fatalf("repeat: %v, %v", again.ID, err)
	}
	if again, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-a", RequiredBytes: 8 << 20}); err != nil || again.ID != vid {
		t.Fatalf("repeat without an id: %v, %v", again.ID, err)
	}
	sid := NewSnapshotID()
	s, err := c.CreateSnapshotWithID(ctx, sid, "snap-a", vid)
	if err != nil || s.ID != sid {
		t.Fatalf("snapshot: %v, %v (asked for %s)", s.ID, err, sid)
	}
	if again, err := c.CreateSnapshotWithID(ctx, sid, "snap-a", vid); err != nil || again.ID != sid {
		t.Fatalf("repeat snapshot: %v, %v", again.ID, err)
	}
	for _, tt := range []struct {
		name  string
		err   error
		class error
	}{
		{"the name with another id", func() error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-a", ID: NewVolumeID(Ploop), RequiredBytes: 8 << 20})
			return err
		}(), ErrExists},
		{"the id with another name", func() error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-b", ID: vid, RequiredBytes: 8 << 20})
			return err
		}(), ErrExists},
		{"a simfs id for a ploop volume", func() error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-c", ID: NewVolumeID(Simfs)})
			return err
		}(), ErrInvalid},
		{"not an id", func() error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-d", ID: "ploop-1"})
			return err
		}(), ErrInvalid},
		{"a path", func() error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-e", ID: "../x"})
			return err
		}(), ErrInvalid},
		{"its own source", func() error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "pvc-f", ID: vid, SourceVolume: vid})
			return err
		}(), ErrInvalid},
		{"snapshot name with another id", func() error {
			_, err := c.CreateSnapshotWithID(ctx, NewSnapshotID(), "snap-a", vid)
			return err
		}(), ErrExists},
		{"snapshot id with another name", func() error {
			_, err := c.CreateSnapshotWithID(ctx, sid, "snap-b", vid)
			return err
		}(), ErrExists},
		{"a volume id for a snapshot", func() error {
			_, err := c.CreateSnapshotWithID(ctx, vid, "snap-c", vid)
			return err
		}(), ErrInvalid},
	} {
		t.Run(tt.name, func(t *testing.T) { wantErr(t, tt.err, tt.class, tt.name) })
	}
	// Nothing of the refused requests was left behind.
	vols, _, err := c.ListVolumes(ctx, "", 0)
	if err != nil || len(vols) != 1 {
		t.Fatalf("volumes after the refusals: %v, %v", vols, err)
	}
	snaps, _, err := c.ListSnapshots(ctx, SnapshotFilter{}, "", 0)
	if err != nil || len(snaps) != 1 {
		t.Fatalf("snapshots after the refusals: %v, %v", snaps, err)
	}
}

func TestErrorClasses(t *testing.T) {
	for _, c := range classes {
		err := fmt.Errorf("create volume %q: %w", "x", c.err)
		name := ClassOf(err)
		if name != c.name {
			t.Errorf("ClassOf(%v) = %q, want %q", err, name, c.name)
		}
		back := FromClass(name, err.Error())
		if !errors.Is(back, c.err) || back.Error() != err.Error() {
			t.Errorf("FromClass(%q) = %v (class kept: %t)", name, back, errors.Is(back, c.err))
		}
	}
	if got := ClassOf(errors.New("disk on fire")); got != "" {
		t.Errorf("ClassOf(unclassified) = %q", got)
	}
	if err := FromClass("", "boom"); ClassOf(err) != "" || err.Error() != "boom" {
		t.Errorf("FromClass(\"\") = %v", err)
	}
	if !Permanent(fmt.Errorf("x: %w", ErrNoSpace)) || Permanent(fmt.Errorf("x: %w", ErrBusy)) {
		t.Error("Permanent: ErrNoSpace must be, ErrBusy must not")
	}
}
