package ploop

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// openvzDescriptor is shaped like what OpenVZ ploop 7 writes for a disk
// with one snapshot, including elements this package does not interpret.
const openvzDescriptor = `<?xml version="1.0" encoding="UTF-8"?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters>
    <Disk_size>20971520</Disk_size>
    <Cylinders>20805</Cylinders>
    <Heads>16</Heads>
    <Sectors>63</Sectors>
    <Padding>0</Padding>
    <Encryption>
      <Engine>{00000000-0000-0000-0000-000000000000}</Engine>
      <Data></Data>
    </Encryption>
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>20971520</End>
      <Blocksize>2048</Blocksize>
      <Image>
        <GUID>{c1b5bbc6-56e4-4b2c-9d8e-5d2e0a0e2a11}</GUID>
        <Type>Compressed</Type>
        <File>root.hds</File>
      </Image>
      <Image>
        <GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>
        <Type>Compressed</Type>
        <File>root.hds.{9a1f0c3e-1111-4c2b-8d7e-5d2e0a0e2a12}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>
    <Shot>
      <GUID>{c1b5bbc6-56e4-4b2c-9d8e-5d2e0a0e2a11}</GUID>
      <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>
      <Temporary/>
    </Shot>
    <Shot>
      <GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>
      <ParentGUID>{c1b5bbc6-56e4-4b2c-9d8e-5d2e0a0e2a11}</ParentGUID>
    </Shot>
  </Snapshots>
</Parallels_disk_image>
`

func TestParseOpenVZDescriptor(t *testing.T) {
	d, err := ParseDescriptor([]byte(openvzDescriptor))
	if err != nil {
		t.Fatal(err)
	}
	if d.Size() != 10<<30 || d.ClusterSize() != 1<<20 {
		t.Fatalf("size %d cluster %d", d.Size(), d.ClusterSize())
	}
	chain := d.Chain()
	if len(chain) != 2 || chain[0].File != "root.hds" || chain[1].GUID != TopGUID {
		t.Fatalf("chain %+v", chain)
	}
	// Unknown elements survive a round trip.
	b, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"<Padding>0</Padding>", "<Engine>{00000000-0000-0000-0000-000000000000}</Engine>", "<Temporary></Temporary>", `Version="1.0"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("re-encoded descriptor lacks %s:\n%s", want, b)
		}
	}
	d2, err := ParseDescriptor(b)
	if err != nil {
		t.Fatal(err)
	}
	if d2.Size() != d.Size() || len(d2.Chain()) != 2 || d2.Chain()[0].GUID != chain[0].GUID {
		t.Fatalf("round trip changed the descriptor")
	}
}

func TestParseDescriptorRejects(t *testing.T) {
	base := openvzDescriptor
	tests := []struct {
		name, old, new string
	}{
		{"root element", "<Parallels_disk_image Version=\"1.0\">", "<Other Version=\"1.0\">"},
		{"version", `Version="1.0"`, `Version="2.0"`},
		{"zero size", "<Disk_size>20971520</Disk_size>", "<Disk_size>0</Disk_size>"},
		{"blocksize", "<Blocksize>2048</Blocksize>", "<Blocksize>3000</Blocksize>"},
		{"end", "<End>20971520</End>", "<End>100</End>"},
		{"file with slash", "<File>root.hds</File>", "<File>../etc/passwd</File>"},
		{"file absolute", "<File>root.hds</File>", "<File>/root.hds</File>"},
		{"file is descriptor", "<File>root.hds</File>", "<File>DiskDescriptor.xml</File>"},
		{"type", "<Type>Compressed</Type>", "<Type>Fancy</Type>"},
		{"bad guid", "<GUID>{c1b5bbc6-56e4-4b2c-9d8e-5d2e0a0e2a11}</GUID>\n        <Type>", "<GUID>nope</GUID>\n        <Type>"},
		{"unknown top", "<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>", "<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab42}</TopGUID>"},
		{"loop", "<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>", "<ParentGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</ParentGUID>"},
		{"entity", "<Padding>0</Padding>", "<Padding>&xxe;</Padding>"},
		{"padding", "<Padding>0</Padding>", "<Padding>1</Padding>"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := strings.Replace(base, tc.old, tc.new, 1)
			if s == base {
				t.Fatalf("test case did not change the descriptor")
			}
			if _, err := ParseDescriptor([]byte(s)); err == nil {
				t.Fatalf("accepted")
			}
		})
	}
	// Without TopGUID the predefined top GUID names the top.
	noTop := strings.Replace(base, "<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>", "", 1)
	if d, err := ParseDescriptor([]byte(noTop)); err != nil || d.Chain()[1].GUID != TopGUID {
		t.Fatalf("descriptor without TopGUID: %v", err)
	}
	// Neither TopGUID nor an image with the predefined GUID: no top.
	noTop = strings.ReplaceAll(noTop, "5fbaabe3-6958-40ff-92a7-860e329aab41", "5fbaabe3-6958-40ff-92a7-860e329aab42")
	if _, err := ParseDescriptor([]byte(noTop)); err == nil {
		t.Fatal("descriptor without a top accepted")
	}
	plainTop := strings.Replace(base, "<Type>Compressed</Type>\n        <File>root.hds.{", "<Type>Plain</Type>\n        <File>root.hds.{", 1)
	if _, err := ParseDescriptor([]byte(plainTop)); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Plain delta above the base: %v", err)
	}
}

func TestWriteDescriptorAtomic(t *testing.T) {
	dir := t.TempDir()
	d := newDescriptor(2048, 64<<10, baseFile, TypeCompressed)
	if err := WriteDescriptor(dir, d); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, DescriptorName+".tmp")); !os.IsNotExist(err) {
		t.Fatalf("temporary file left behind: %v", err)
	}
	got, err := ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Size() != 2048*512 || got.ClusterSize() != 64<<10 || got.Params.Cylinders != 2048/(16*63) {
		t.Fatalf("read back %+v", got.Params)
	}
	bad := d.clone()
	bad.Snapshots.TopGUID = NoParentGUID
	if err := WriteDescriptor(dir, bad); err == nil {
		t.Fatal("an invalid descriptor was written")
	}
	if _, err := ReadDescriptor(dir); err != nil {
		t.Fatalf("a refused write damaged the descriptor: %v", err)
	}
}

func TestNewGUID(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		g := NewGUID()
		if !ValidGUID(g) || seen[g] {
			t.Fatalf("bad or repeated GUID %q", g)
		}
		seen[g] = true
	}
}

func FuzzDescriptor(f *testing.F) {
	f.Add([]byte(openvzDescriptor))
	b, _ := newDescriptor(2048, 64<<10, baseFile, TypePlain).Marshal()
	f.Add(b)
	f.Add([]byte(`<Parallels_disk_image Version="1.0"><Disk_Parameters><Disk_size>1</Disk_size></Disk_Parameters></Parallels_disk_image>`))
	f.Add([]byte(`<?xml version="1.0" encoding="ISO-8859-1"?><Parallels_disk_image/>`))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseDescriptor(data)
		if err != nil {
			return
		}
		chain := d.Chain()
		if len(chain) == 0 || len(chain) > MaxChain {
			t.Fatalf("valid descriptor with a chain of %d", len(chain))
		}
		for _, im := range chain {
			if strings.Contains(im.File, "/") {
				t.Fatalf("file %q escapes the directory", im.File)
			}
		}
		out, err := d.Marshal()
		if err != nil {
			t.Fatalf("marshal a valid descriptor: %v", err)
		}
		d2, err := ParseDescriptor(out)
		if err != nil {
			t.Fatalf("re-parse: %v\n%s", err, out)
		}
		c2 := d2.Chain()
		if d2.Size() != d.Size() || d2.ClusterSize() != d.ClusterSize() || len(c2) != len(chain) {
			t.Fatalf("round trip changed the descriptor")
		}
		for i := range chain {
			if c2[i].GUID != chain[i].GUID || c2[i].File != chain[i].File || c2[i].Type != chain[i].Type {
				t.Fatalf("round trip changed image %d", i)
			}
		}
	})
}
