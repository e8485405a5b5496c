package catalog

import (
	"fmt"
	"slices"
	"testing"
)

// TestListPagination: pages cover every object once, in a stable order,
// even when objects are deleted between pages; foreign tokens are refused.
func TestListPagination(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	var ids []string
	for i := range 7 {
		ids = append(ids, mustCreate(t, c, VolumeRequest{Name: fmt.Sprint("v", i), RequiredBytes: mib}).ID)
	}
	slices.Sort(ids)
	all, next, err := c.ListVolumes(ctx, "", 0)
	if err != nil || next != "" || len(all) != 7 {
		t.Fatalf("all: %d, %q, %v", len(all), next, err)
	}
	var got []string
	tok := ""
	pages := 0
	for {
		page, next, err := c.ListVolumes(ctx, tok, 3)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, v := range page {
			got = append(got, v.ID)
		}
		if pages == 1 {
			// A deletion of a listed volume and of the page's last
			// one does not disturb the next page.
			if err := c.DeleteVolume(ctx, page[0].ID); err != nil {
				t.Fatal(err)
			}
			if err := c.DeleteVolume(ctx, page[2].ID); err != nil {
				t.Fatal(err)
			}
		}
		if next == "" {
			break
		}
		tok = next
	}
	if pages != 3 || !slices.Equal(got, ids) {
		t.Fatalf("%d pages: %v, want %v", pages, got, ids)
	}

	v := ids[1]
	w := ids[3]
	var snaps []string
	for i := range 5 {
		src := v
		if i%2 == 1 {
			src = w
		}
		snaps = append(snaps, mustSnapshot(t, c, fmt.Sprint("s", i), src).ID)
	}
	bySource, _, err := c.ListSnapshots(ctx, SnapshotFilter{SourceVolume: w}, "", 0)
	if err != nil || len(bySource) != 2 {
		t.Fatalf("by source: %v, %v", bySource, err)
	}
	for _, s := range bySource {
		if s.SourceVolume != w {
			t.Fatalf("by source: %+v", s)
		}
	}
	byID, _, err := c.ListSnapshots(ctx, SnapshotFilter{SnapshotID: snaps[2]}, "", 0)
	if err != nil || len(byID) != 1 || byID[0].ID != snaps[2] {
		t.Fatalf("by id: %v, %v", byID, err)
	}
	none, _, err := c.ListSnapshots(ctx, SnapshotFilter{SnapshotID: NewSnapshotID()}, "", 0)
	if err != nil || len(none) != 0 {
		t.Fatalf("unknown id: %v, %v", none, err)
	}
	slices.Sort(snaps)
	got = nil
	tok = ""
	for {
		page, next, err := c.ListSnapshots(ctx, SnapshotFilter{}, tok, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range page {
			got = append(got, s.ID)
		}
		if next == "" {
			break
		}
		tok = next
	}
	if !slices.Equal(got, snaps) {
		t.Fatalf("snapshot pages: %v, want %v", got, snaps)
	}

	volTok := makeToken(volumeTokenKind, ids[0])
	snapTok := makeToken(snapshotTokenKind, snaps[0])
	for _, bad := range []string{"not-a-token", snapTok, makeToken(volumeTokenKind, "../../x"), "%%%"} {
		_, _, err := c.ListVolumes(ctx, bad, 0)
		wantErr(t, err, ErrBadToken, "volume list token "+bad)
	}
	for _, bad := range []string{"not-a-token", volTok} {
		_, _, err := c.ListSnapshots(ctx, SnapshotFilter{}, bad, 0)
		wantErr(t, err, ErrBadToken, "snapshot list token "+bad)
	}
	_, _, err = c.ListVolumes(ctx, "", -1)
	wantErr(t, err, ErrInvalid, "negative max")
}
