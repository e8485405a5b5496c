package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks as an
// initramfs. It is written here rather than shelling out to cpio(1) because
// the archive needs a /dev/console device node, which cpio(1) could only copy
// from a real node that an unprivileged user cannot create.
type cpioWriter struct {
	w   *bufio.Writer
	ino int
	err error
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriter(w), ino: 1}
}

const (
	cpioModeDir     = 0o040000
	cpioModeFile    = 0o100000
	cpioModeSymlink = 0o120000
	cpioModeChar    = 0o020000
)

func (c *cpioWriter) header(name string, mode uint32, size int, rdevMajor, rdevMinor uint32) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := 1
	if mode&0o170000 == cpioModeDir {
		nlink = 2
	}
	_, c.err = fmt.Fprintf(c.w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	if c.err != nil {
		return
	}
	c.write([]byte(name + "\x00"))
	c.pad(110 + len(name) + 1)
}

func (c *cpioWriter) write(b []byte) {
	if c.err == nil {
		_, c.err = c.w.Write(b)
	}
}

// pad aligns the stream to 4 bytes after n bytes of header or data.
func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) Dir(name string) { c.header(name, cpioModeDir|0o755, 0, 0, 0) }

func (c *cpioWriter) CharDev(name string, major, minor uint32) {
	c.header(name, cpioModeChar|0o600, 0, major, minor)
}

func (c *cpioWriter) Symlink(name, target string) {
	c.header(name, cpioModeSymlink|0o777, len(target), 0, 0)
	c.write([]byte(target))
	c.pad(len(target))
}

func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.header(name, cpioModeFile|perm, len(data), 0, 0)
	c.write(data)
	c.pad(len(data))
}

// CopyFile adds the host file src as name.
func (c *cpioWriter) CopyFile(name string, perm uint32, src string) {
	if c.err != nil {
		return
	}
	data, err := os.ReadFile(src)
	if err != nil {
		c.err = err
		return
	}
	c.File(name, perm, data)
}

// Close writes the trailer and flushes; it reports the first error seen.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
