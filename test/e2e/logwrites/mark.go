package logwrites

import (
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dmControl is device-mapper's control node.
const dmControl = "/dev/mapper/control"

// MaxMarkLen is the longest mark name the kernel keeps whole with 512-byte
// sectors (a sector less the entry header and the name's NUL).
const MaxMarkLen = minSectorSize - entrySize - 1

// Mark inserts a mark named name into the log of the dm-log-writes device
// named device, as `dmsetup message DEVICE 0 mark NAME` does. The mark is
// queued behind every entry already made durable (a FLUSH that completed
// before Mark was called is in the log before it) and before any write
// that is issued after Mark returns; writes that completed but were not yet
// flushed come after it. It sends the device-mapper ioctl itself: a
// process start per mark is slow under emulation.
func Mark(device, name string) error {
	if name == "" || len(name) > MaxMarkLen || strings.ContainsAny(name, " \t\n\x00") {
		return fmt.Errorf("log-writes mark %q: want 1 to %d bytes without spaces", name, MaxMarkLen)
	}
	if device == "" || len(device) >= unix.DM_NAME_LEN || strings.ContainsAny(device, "/\x00") {
		return fmt.Errorf("log-writes mark: invalid device-mapper name %q", device)
	}
	// struct dm_ioctl, then struct dm_target_msg {u64 sector; char message[]}.
	msg := "mark " + name
	buf := make([]byte, unix.SizeofDmIoctl+8+len(msg)+1)
	le := binary.LittleEndian
	le.PutUint32(buf[0:], unix.DM_VERSION_MAJOR)
	le.PutUint32(buf[12:], uint32(len(buf)))    // data_size
	le.PutUint32(buf[16:], unix.SizeofDmIoctl)  // data_start
	copy(buf[48:48+unix.DM_NAME_LEN-1], device) // name
	copy(buf[unix.SizeofDmIoctl+8:], msg)       // sector 0, then the text
	f, err := os.OpenFile(dmControl, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("log-writes mark %q on %s: %w", name, device, err)
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.DM_TARGET_MSG, uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return fmt.Errorf("log-writes mark %q on %s: DM_TARGET_MSG: %w", name, device, errno)
	}
	return nil
}
