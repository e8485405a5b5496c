package attachments

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func ploopRecord() record {
	return record{
		Version: recordVersion, VolumeID: "ploop-1", Kind: Ploop,
		Path: "/root/ploop/volumes/ploop-1", StagingPath: "/kubelet/staging/ploop-1",
		FSType: FSXFS, MkfsOptions: []string{"-m", "crc=1"}, MountOptions: []string{"noatime"},
		OnlineDiscard: true, Transport: TransportNBD, Device: "/dev/nbd3", Staged: true,
		Targets: []target{{Path: "/kubelet/pods/a"}, {Path: "/kubelet/pods/b", ReadOnly: true}},
	}
}

func TestRecordRoundTrip(t *testing.T) {
	for _, r := range []record{
		ploopRecord(),
		{Version: recordVersion, VolumeID: "ploop-b", Kind: Ploop, Path: "/r/b", StagingPath: "/s/b", Block: true, Transport: TransportNBD},
		{Version: recordVersion, VolumeID: "ploop-u", Kind: Ploop, Path: "/r/u", StagingPath: "/s/u", Block: true, Transport: TransportUblk, Device: "/dev/ublkb12"},
		{Version: recordVersion, VolumeID: "simfs-c", Kind: Simfs, Path: "/r/c", StagingPath: "/s/c", Staged: true},
	} {
		b, err := r.encode()
		if err != nil {
			t.Fatal(err)
		}
		got, err := parseRecord(b)
		if err != nil {
			t.Fatalf("parse %s: %v", b, err)
		}
		if !reflect.DeepEqual(got, r) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, r)
		}
	}
}

// TestRecordBeforeUblk: a record written before transports existed is an
// nbd volume.
func TestRecordBeforeUblk(t *testing.T) {
	r := ploopRecord()
	r.Transport = ""
	b, err := r.encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseRecord(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Transport != TransportNBD {
		t.Fatalf("transport %q, want nbd", got.Transport)
	}
}

func TestParseRecordRefuses(t *testing.T) {
	mod := func(f func(r *record)) string {
		r := ploopRecord()
		f(&r)
		b, err := r.encode()
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	good, _ := ploopRecord().encode()
	for _, tc := range []struct{ name, in string }{
		{"empty", ""},
		{"not json", "hello"},
		{"trailing data", string(good) + "{}"},
		{"unknown field", strings.Replace(string(good), `"version"`, `"extra": 1, "version"`, 1)},
		{"version", mod(func(r *record) { r.Version = 2 })},
		{"bad id", mod(func(r *record) { r.VolumeID = "../x" })},
		{"relative path", mod(func(r *record) { r.Path = "root/x" })},
		{"unclean staging", mod(func(r *record) { r.StagingPath = "/a/../b" })},
		{"root staging", mod(func(r *record) { r.StagingPath = "/" })},
		{"kind", mod(func(r *record) { r.Kind = "lvm" })},
		{"fs type", mod(func(r *record) { r.FSType = "btrfs" })},
		{"device", mod(func(r *record) { r.Device = "/dev/sda" })},
		{"device leading zero", mod(func(r *record) { r.Device = "/dev/nbd03" })},
		{"transport", mod(func(r *record) { r.Transport = "iscsi" })},
		{"nbd device over ublk", mod(func(r *record) { r.Transport = TransportUblk })},
		{"ublk device over nbd", mod(func(r *record) { r.Device = "/dev/ublkb1" })},
		{"ublk device leading zero", mod(func(r *record) { r.Transport, r.Device = TransportUblk, "/dev/ublkb01" })},
		{"simfs with transport", mod(func(r *record) {
			r.Kind, r.Transport, r.Device = Simfs, TransportNBD, ""
			r.FSType, r.MkfsOptions, r.MountOptions, r.OnlineDiscard, r.Block = "", nil, nil, false, false
		})},
		{"block with fs", mod(func(r *record) { r.Block = true })},
		{"simfs with device", mod(func(r *record) {
			r.Kind = Simfs
			r.FSType = ""
			r.MkfsOptions = nil
			r.MountOptions = nil
			r.OnlineDiscard = false
		})},
		{"option with newline", mod(func(r *record) { r.MountOptions = []string{"a\nb"} })},
		{"target relative", mod(func(r *record) { r.Targets = []target{{Path: "x"}} })},
		{"target twice", mod(func(r *record) { r.Targets = []target{{Path: "/x"}, {Path: "/x"}} })},
		{"huge", strings.Repeat(" ", maxRecordSize+1)},
	} {
		if _, err := parseRecord([]byte(tc.in)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: parseRecord = %v, want ErrInvalid", tc.name, err)
		}
	}
}

// FuzzParseRecord: the parser never panics, and whatever it accepts
// survives encode and parse unchanged.
func FuzzParseRecord(f *testing.F) {
	good, _ := ploopRecord().encode()
	f.Add(good)
	f.Add([]byte(`{"version":1,"volumeId":"s","kind":"simfs","path":"/a","stagingPath":"/b","staged":true}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRecord(b)
		if err != nil {
			return
		}
		again, err := r.encode()
		if err != nil {
			t.Fatal(err)
		}
		r2, err := parseRecord(again)
		if err != nil {
			t.Fatalf("re-parse of an accepted record: %v\n%s", err, again)
		}
		if !reflect.DeepEqual(r, r2) {
			t.Fatalf("round trip changed the record:\n%+v\n%+v", r, r2)
		}
	})
}

func TestStateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nodes", "n1")
	s, err := openStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	if _, err := openStateDir(dir); err == nil || !strings.Contains(err.Error(), "locked") {
		t.Fatalf("a second owner of the state directory: %v", err)
	}
	r := ploopRecord()
	if err := s.write(r); err != nil {
		t.Fatal(err)
	}
	r2 := r.withoutTarget("/kubelet/pods/a")
	if err := s.write(r2); err != nil {
		t.Fatal(err)
	}
	bad := r
	bad.VolumeID = "../escape"
	if err := s.write(bad); !errors.Is(err, ErrInvalid) {
		t.Fatalf("write of an invalid record: %v", err)
	}
	// Leftovers: an interrupted write's temporary file, a corrupt record,
	// a file that is not a record.
	vd := s.volumesDir()
	for name, data := range map[string]string{
		".ploop-1.tmp-123": "partial",
		"ploop-bad.json":   "{",
		"README":           "not ours",
	} {
		if err := os.WriteFile(filepath.Join(vd, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.load()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("load found %d records, want 2: %+v", len(got), got)
	}
	for _, l := range got {
		switch l.id {
		case "ploop-1":
			if l.err != nil || !reflect.DeepEqual(l.rec, r2) {
				t.Fatalf("loaded %+v, %v; want %+v", l.rec, l.err, r2)
			}
		case "ploop-bad":
			if l.err == nil {
				t.Fatal("a corrupt record loaded without error")
			}
		default:
			t.Fatalf("unexpected record %q", l.id)
		}
	}
	if _, err := os.Stat(filepath.Join(vd, ".ploop-1.tmp-123")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary file left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(vd, "README")); err != nil {
		t.Fatalf("a file that is not ours was touched: %v", err)
	}
	if err := s.remove("ploop-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.remove("ploop-1"); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	ents, _ := os.ReadDir(vd)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Fatalf("temporary file %s left by write", e.Name())
		}
	}
}

// TestStateDirSymlink: a state directory reached through a symlink is
// refused, since records drive mounts.
func TestStateDirSymlink(t *testing.T) {
	base := t.TempDir()
	real := filepath.Join(base, "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if s, err := openStateDir(link); err == nil {
		s.close()
		t.Fatal("state directory through a symlink accepted")
	}
}
