package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// memory is what /proc/PID/status says of a process's resident set, in
// KiB.
type memory struct {
	RSS, Anon int64
}

// parseStatus reads VmRSS and RssAnon from /proc/PID/status.
func parseStatus(data []byte) (memory, error) {
	var m memory
	found := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch key {
		case "VmRSS":
			dst = &m.RSS
		case "RssAnon":
			dst = &m.Anon
		default:
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return m, fmt.Errorf("%s: %q is not a size in kB", key, val)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || n < 0 {
			return m, fmt.Errorf("%s: %q is not a size in kB", key, val)
		}
		*dst = n
		found++
	}
	if found != 2 {
		return m, fmt.Errorf("VmRSS or RssAnon missing from /proc/PID/status")
	}
	return m, nil
}

func processMemory(pid int) (memory, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, err
	}
	return parseStatus(data)
}

// benchRSS measures the driver's resident set with 0, 1 and N sparse
// volumes staged in Block mode. The driver is restarted first, so that
// the earlier measurements' buffers do not count.
func (b *bench) benchRSS(ctx context.Context) (string, error) {
	if err := b.stopDriver(); err != nil {
		return "", err
	}
	if err := b.startDriver(ctx); err != nil {
		return "", err
	}
	pid := b.driver.Pid()
	fresh, err := processMemory(pid)
	if err != nil {
		return "", err
	}
	n := b.cfg.rssVolumes
	size := b.cfg.rssGiB << 30
	vols := make([]*volume, n)
	for i := range vols {
		if vols[i], err = b.createVolume(ctx, fmt.Sprintf("bench-rss-%02d", i+1), size, ""); err != nil {
			return "", err
		}
	}
	at := map[int]memory{}
	if at[0], err = processMemory(pid); err != nil {
		return "", err
	}
	for i, v := range vols {
		if err := b.stage(ctx, v, false); err != nil {
			return "", err
		}
		if err := touch(v.dev, size); err != nil {
			return "", err
		}
		if i+1 == 1 || i+1 == n {
			if at[i+1], err = processMemory(pid); err != nil {
				return "", err
			}
			b.logf("rss: %2d volume(s) staged: VmRSS %d KiB", i+1, at[i+1].RSS)
		}
	}
	for _, v := range vols {
		if err := b.deleteVolume(ctx, v); err != nil {
			return "", err
		}
	}

	t := table{
		title:  fmt.Sprintf("ploop-csi (mode all, one process) resident set, %d GiB sparse ploop volumes staged (Block)", b.cfg.rssGiB),
		header: []string{"volumes staged", "VmRSS MiB", "RssAnon MiB", "per volume vs 0, MiB"},
	}
	mib := func(kib int64) string { return num(float64(kib)/1024, 1) }
	t.rows = append(t.rows, []string{"0 (fresh start)", mib(fresh.RSS), mib(fresh.Anon), ""})
	counts := []int{0, 1}
	if n > 1 {
		counts = append(counts, n)
	}
	for _, c := range counts {
		per := ""
		if c > 0 {
			per = num(float64(at[c].RSS-at[0].RSS)/1024/float64(c), 2)
		}
		label := fmt.Sprint(c)
		if c == 0 {
			label = fmt.Sprintf("0 (%d created)", n)
		}
		t.rows = append(t.rows, []string{label, mib(at[c].RSS), mib(at[c].Anon), per})
	}
	perVol := float64(at[n].RSS-at[0].RSS) / 1024 / float64(n)
	verdict := "met"
	if perVol > 16 {
		verdict = "NOT met"
	}
	t.notes = []string{
		fmt.Sprintf("goal: at most 16 MiB more per volume: %s (%.2f MiB per volume with %d staged)", verdict, perVol, n),
		"each staged volume had 1 MiB written at its start and 64 reads of 4 KiB spread over its size (direct I/O)",
	}
	if n > 1 {
		t.notes = append(t.notes, fmt.Sprintf("from 1 to %d volumes: %.2f MiB per added volume", n,
			float64(at[n].RSS-at[1].RSS)/1024/float64(n-1)))
	}
	return t.String(), nil
}

// touch does a little I/O on a staged volume, so that what serving it
// costs is counted: 1 MiB written at its start, and 64 reads of 4 KiB
// spread over its size (holes: no space is allocated).
func touch(dev string, size int64) error {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// O_DIRECT needs an aligned buffer: an anonymous mapping is.
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("write %s: %w", dev, err)
	}
	const reads = 64
	step := size / reads &^ 4095
	for i := int64(0); i < reads; i++ {
		if _, err := f.ReadAt(buf[:4096], i*step); err != nil {
			return fmt.Errorf("read %s at %d: %w", dev, i*step, err)
		}
	}
	return f.Sync()
}
