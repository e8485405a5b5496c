package csisanity

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/csidriver"
	"github.com/ploop-csi/ploop-csi/test/e2e/demo"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// testDemo runs `make demo` (test/e2e/demo, as cmd/csidemo does) against
// the real driver: every step must hold, the driver must log no error,
// and the demo must leave no work directory behind. A demo whose driver
// dies at once must fail and still clean up.
func testDemo(t *testing.T) {
	leftovers := func(t *testing.T) {
		t.Helper()
		if left, _ := filepath.Glob("/tmp/csidemo-*"); len(left) != 0 {
			t.Errorf("work directories left behind: %v", left)
		}
	}
	t.Run("Lifecycle", func(t *testing.T) {
		var log bytes.Buffer
		err := demo.Run(testCtx(t, 10*time.Minute), demo.Config{
			Driver: filepath.Join(vmtest.ExchangeDir(), "ploop-csi"), Out: &lineLog{t: t}, DriverLog: &log,
		})
		if err != nil {
			t.Errorf("demo: %v\nploop-csi log:\n%s", err, tail(log.String(), 200))
		}
		csidriver.CheckLog(t, log.String())
		leftovers(t)
	})
	t.Run("DriverDies", func(t *testing.T) {
		var out bytes.Buffer
		err := demo.Run(testCtx(t, 2*time.Minute), demo.Config{Driver: "/bin/false", Out: &out})
		if err == nil || !strings.Contains(out.String(), "FAILED") {
			t.Errorf("demo with a driver that exits at once: %v, want a failure it prints; output:\n%s", err, out.String())
		}
		leftovers(t)
	})
}

// lineLog writes each line it is given to the test log.
type lineLog struct {
	t   *testing.T
	buf []byte
}

func (w *lineLog) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.t.Log(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}
