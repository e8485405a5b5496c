package driver

import (
	"strings"
	"testing"

	"github.com/ploop-csi/ploop-csi/test/e2e/csisanity"
)

// TestSanityChild runs the csi-sanity suite when TestSanity starts this
// binary as its child (csisanity.Run); on its own it does nothing.
func TestSanityChild(t *testing.T) { csisanity.Child(t) }

// TestSanity runs csi-sanity against the controller and identity services
// over the real catalogue on this host, with the node's attachments faked:
// it proves the translation, not the node (the VM test in test/e2e/csisanity
// runs the real driver). simfs needs project quota, which this host lacks,
// so only the ploop sets run here.
func TestSanity(t *testing.T) {
	if csisanity.InChild() {
		t.Skip("running as csi-sanity's child")
	}
	for _, set := range csisanity.Sets() {
		if !strings.HasPrefix(set.Name, "ploop") {
			continue
		}
		t.Run(set.Name, func(t *testing.T) {
			e := newEnv(t, envOptions{overcommit: 1000})
			r := csisanity.Run(ctxT(t), t, "TestSanityChild", set, "unix://"+e.sock, t.TempDir())
			r.Check(t)
		})
	}
}
