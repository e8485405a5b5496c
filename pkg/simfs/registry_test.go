package simfs

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const validRegistry = `{
  "version": 1,
  "nextProject": 103,
  "volumes": {
    "pvc-a": {"project": 100, "bytes": 4096, "inodes": 10, "ready": true},
    "pvc-b": {"project": 102, "bytes": 8192, "inodes": 20, "source": "snap-1", "ready": false}
  },
  "snapshots": {
    "snap-1": {"source": "pvc-a", "bytes": 4096, "inodes": 10, "usedBytes": 4096, "usedInodes": 1, "createdNs": 1, "ready": true}
  }
}`

func TestParseRegistry(t *testing.T) {
	r, err := parseRegistry([]byte(validRegistry))
	if err != nil {
		t.Fatal(err)
	}
	if r.NextProject != 103 || r.Volumes["pvc-b"].Project != 102 || r.Snapshots["snap-1"].Source != "pvc-a" {
		t.Fatalf("parsed %+v", r)
	}
	bad := map[string]string{
		"empty":            ``,
		"not json":         `nope`,
		"trailing":         validRegistry + `{}`,
		"unknown field":    `{"version":1,"nextProject":5,"extra":1}`,
		"version":          `{"version":2,"nextProject":5}`,
		"next zero":        `{"version":1,"nextProject":0}`,
		"bad volume id":    `{"version":1,"nextProject":5,"volumes":{"../x":{"project":1,"bytes":4096,"inodes":1}}}`,
		"null volume":      `{"version":1,"nextProject":5,"volumes":{"x":null}}`,
		"project zero":     `{"version":1,"nextProject":5,"volumes":{"x":{"project":0,"bytes":4096,"inodes":1}}}`,
		"project max":      `{"version":1,"nextProject":5,"volumes":{"x":{"project":4294967295,"bytes":4096,"inodes":1}}}`,
		"project >= next":  `{"version":1,"nextProject":5,"volumes":{"x":{"project":5,"bytes":4096,"inodes":1}}}`,
		"shared project":   `{"version":1,"nextProject":5,"volumes":{"x":{"project":1,"bytes":4096,"inodes":1},"y":{"project":1,"bytes":4096,"inodes":1}}}`,
		"zero bytes":       `{"version":1,"nextProject":5,"volumes":{"x":{"project":1,"bytes":0,"inodes":1}}}`,
		"bad source":       `{"version":1,"nextProject":5,"volumes":{"x":{"project":1,"bytes":4096,"inodes":1,"source":"a/b"}}}`,
		"bad snapshot id":  `{"version":1,"nextProject":5,"snapshots":{"a/b":{"source":"x","bytes":4096,"inodes":1}}}`,
		"null snapshot":    `{"version":1,"nextProject":5,"snapshots":{"s":null}}`,
		"snapshot source":  `{"version":1,"nextProject":5,"snapshots":{"s":{"source":"","bytes":4096,"inodes":1}}}`,
		"snapshot limits":  `{"version":1,"nextProject":5,"snapshots":{"s":{"source":"x","bytes":0,"inodes":1}}}`,
		"negative project": `{"version":1,"nextProject":5,"volumes":{"x":{"project":-1,"bytes":4096,"inodes":1}}}`,
	}
	for name, data := range bad {
		if r, err := parseRegistry([]byte(data)); err == nil {
			t.Errorf("%s: parsed %+v, want an error", name, r)
		}
	}
}

func TestRegistrySaveLoad(t *testing.T) {
	dir := t.TempDir()
	r, err := loadRegistry(dir, 7)
	if err != nil {
		t.Fatal(err)
	}
	if r.NextProject != 7 || len(r.Volumes) != 0 {
		t.Fatalf("fresh registry %+v", r)
	}
	r.Volumes["v1"] = &volumeRecord{Project: 7, Bytes: 4096, Inodes: 5, Ready: true}
	r.NextProject = 8
	r.Snapshots["s1"] = &snapshotRecord{Source: "v1", Bytes: 4096, Inodes: 5, Ready: true}
	if err := saveRegistry(dir, r); err != nil {
		t.Fatal(err)
	}
	got, err := loadRegistry(dir, 1)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, r) {
		t.Fatalf("reloaded %+v, want %+v", got, r)
	}
	if _, err := os.Stat(filepath.Join(dir, registryFile+".tmp")); !os.IsNotExist(err) {
		t.Fatalf("temporary file left behind: %v", err)
	}
	// A damaged registry is an error, never a fresh start.
	if err := os.WriteFile(filepath.Join(dir, registryFile), []byte(`{"version":1,`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadRegistry(dir, 1); err == nil || !strings.Contains(err.Error(), registryFile) {
		t.Fatalf("damaged registry: err = %v", err)
	}
}

// FuzzParseRegistry: the parser never panics, and whatever it accepts keeps
// its invariants and survives a marshal/parse round trip unchanged.
func FuzzParseRegistry(f *testing.F) {
	f.Add([]byte(validRegistry))
	f.Add([]byte(`{"version":1,"nextProject":1}`))
	f.Add([]byte(`{"version":1,"nextProject":5,"volumes":{"x":{"project":1,"bytes":4096,"inodes":1},"y":{"project":1,"bytes":4096,"inodes":1}}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := parseRegistry(data)
		if err != nil {
			return
		}
		seen := map[uint32]bool{}
		for id, v := range r.Volumes {
			if ValidateID(id) != nil || v.Project == 0 || v.Project >= r.NextProject || seen[v.Project] {
				t.Fatalf("accepted bad volume %q %+v (next %d)", id, v, r.NextProject)
			}
			seen[v.Project] = true
		}
		out, err := r.marshal()
		if err != nil {
			t.Fatal(err)
		}
		again, err := parseRegistry(out)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", out, err)
		}
		if !reflect.DeepEqual(r, again) {
			t.Fatalf("round trip changed %+v to %+v", r, again)
		}
	})
}
