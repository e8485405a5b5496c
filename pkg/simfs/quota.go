package simfs

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// quotaFS is the kernel interface simfs needs: project IDs on directories and
// project quota limits and usage. kernelQuota implements it with ioctls and
// quotactl_fd; unit tests substitute an in-memory one to test the logic above.
type quotaFS interface {
	// enforced returns nil when project quota limits are enforced, otherwise
	// an error wrapping ErrQuotaNotEnforced that says why.
	enforced() error
	// setProject sets the project ID and FS_XFLAG_PROJINHERIT on a directory.
	setProject(dirfd int, project uint32) error
	// project returns the project ID of an open file.
	project(fd int) (uint32, error)
	// setLimits sets hard limits (0 = none) for a project.
	setLimits(project uint32, bytes, inodes uint64) error
	// usage returns the bytes and inodes charged to a project.
	usage(project uint32) (quotaUsage, error)
	// usedProjects returns every project ID the quota knows (usage or limits).
	usedProjects() (map[uint32]bool, error)
}

type quotaUsage struct {
	Bytes, Inodes           uint64
	BytesLimit, InodesLimit uint64
}

// Kernel ABI (linux/fs.h, linux/quota.h, linux/dqblk_xfs.h); x/sys/unix has none of it.
const (
	fsIocFsgetxattr    = 0x801c581f // _IOR('X', 31, struct fsxattr)
	fsIocFssetxattr    = 0x401c5820 // _IOW('X', 32, struct fsxattr)
	fsXflagProjinherit = 0x00000200

	prjQuota = 2

	qGetQuota     = 0x800007
	qSetQuota     = 0x800008
	qGetNextQuota = 0x800009
	qifBlimits    = 1
	qifIlimits    = 4
	qifDqblkSize  = 1024 // if_dqblk block limits are in 1 KiB units

	qXGetQuota     = 0x5803 // XQM_CMD(3)
	qXSetQLim      = 0x5804 // XQM_CMD(4)
	qXGetQStatV    = 0x5808 // XQM_CMD(8)
	qXGetNextQuota = 0x5809 // XQM_CMD(9)
	fsDquotVersion = 1
	fsProjQuota    = 2
	fsDqIhard      = 2
	fsDqBhard      = 8
	fsQstatvVer1   = 1
	fsQuotaPdqAcct = 0x10
	fsQuotaPdqEnfd = 0x20
	xfsBBSize      = 512 // fs_disk_quota block counts are in 512-byte basic blocks

	xfsSuperMagic  = 0x58465342
	ext4SuperMagic = 0xef53
)

type fsxattr struct {
	Xflags     uint32
	Extsize    uint32
	Nextents   uint32
	Projid     uint32
	Cowextsize uint32
	Pad        [8]byte
}

type ifDqblk struct {
	BHardlimit uint64
	BSoftlimit uint64
	CurSpace   uint64
	IHardlimit uint64
	ISoftlimit uint64
	CurInodes  uint64
	BTime      uint64
	ITime      uint64
	Valid      uint32
}

// ifNextDqblk is if_dqblk with dqb_id packed right after dqb_valid.
type ifNextDqblk struct {
	BHardlimit uint64
	BSoftlimit uint64
	CurSpace   uint64
	IHardlimit uint64
	ISoftlimit uint64
	CurInodes  uint64
	BTime      uint64
	ITime      uint64
	Valid      uint32
	ID         uint32
}

type fsDiskQuota struct {
	Version      int8
	Flags        int8
	Fieldmask    uint16
	ID           uint32
	BlkHardlimit uint64
	BlkSoftlimit uint64
	InoHardlimit uint64
	InoSoftlimit uint64
	Bcount       uint64
	Icount       uint64
	Itimer       int32
	Btimer       int32
	Iwarns       uint16
	Bwarns       uint16
	ItimerHi     int8
	BtimerHi     int8
	RtbtimerHi   int8
	Padding2     int8
	RtbHardlimit uint64
	RtbSoftlimit uint64
	Rtbcount     uint64
	Rtbtimer     int32
	Rtbwarns     uint16
	Padding3     int16
	Padding4     [8]byte
}

// Compile-time checks of the ABI sizes.
var (
	_ [28]byte  = [unsafe.Sizeof(fsxattr{})]byte{}
	_ [72]byte  = [unsafe.Sizeof(ifDqblk{})]byte{}
	_ [72]byte  = [unsafe.Sizeof(ifNextDqblk{})]byte{}
	_ [68]byte  = [unsafe.Offsetof(ifNextDqblk{}.ID)]byte{}
	_ [112]byte = [unsafe.Sizeof(fsDiskQuota{})]byte{}
)

func qcmd(cmd, typ uint32) uintptr { return uintptr(cmd<<8 | typ&0xff) }

// quotactlFD calls quotactl_fd(2) (Linux ≥ 5.14), which addresses the
// filesystem by an open file instead of by its block device path.
func quotactlFD(fd int, cmd uintptr, id uint32, addr unsafe.Pointer) error {
	_, _, e := unix.Syscall6(unix.SYS_QUOTACTL_FD, uintptr(fd), cmd, uintptr(id), uintptr(addr), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// quotactlFDExists tells a kernel without quotactl_fd (ENOSYS for any
// argument) from a filesystem without quota support (also ENOSYS): the
// syscall, when present, rejects a bad descriptor first.
func quotactlFDExists() bool {
	return !errors.Is(quotactlFD(-1, qcmd(qXGetQStatV, prjQuota), 0, nil), unix.ENOSYS)
}

func getFsxattr(fd int) (fsxattr, error) {
	var a fsxattr
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFsgetxattr, uintptr(unsafe.Pointer(&a)))
	if e != 0 {
		return a, fmt.Errorf("FS_IOC_FSGETXATTR: %w", e)
	}
	return a, nil
}

func setFsxattr(fd int, a *fsxattr) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFssetxattr, uintptr(unsafe.Pointer(a)))
	if e != 0 {
		return fmt.Errorf("FS_IOC_FSSETXATTR: %w", e)
	}
	return nil
}

// kernelQuota drives the real kernel for the filesystem holding fd. xfs gets
// its native XFS quota commands, everything else the generic VFS ones.
type kernelQuota struct {
	fd  int // any open directory on the filesystem; owned by Root
	xfs bool
}

func newKernelQuota(fd int) (*kernelQuota, error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return nil, fmt.Errorf("statfs: %w", err)
	}
	return &kernelQuota{fd: fd, xfs: st.Type == xfsSuperMagic}, nil
}

func (k *kernelQuota) enforced() error {
	// fs_quota_statv: qs_version (s8), pad (u8), qs_flags (u16), ...; the
	// kernel fills at most 80 bytes, the buffer leaves room for growth.
	var buf [256]byte
	buf[0] = fsQstatvVer1
	err := quotactlFD(k.fd, qcmd(qXGetQStatV, prjQuota), 0, unsafe.Pointer(&buf[0]))
	switch {
	case errors.Is(err, unix.ENOSYS) && !quotactlFDExists():
		return fmt.Errorf("kernel has no quotactl_fd (needs Linux 5.14 or later built with CONFIG_QUOTACTL): %w: %w", ErrQuotaNotEnforced, err)
	case errors.Is(err, unix.ENOSYS):
		return fmt.Errorf("filesystem does not support quota: %w: %w", ErrQuotaNotEnforced, err)
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOTTY),
		errors.Is(err, unix.EINVAL), errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOENT):
		return fmt.Errorf("filesystem has no project quota (ext4: mkfs -O quota,project, mount -o prjquota; xfs: mount -o prjquota): %w: %w", ErrQuotaNotEnforced, err)
	case err != nil:
		return fmt.Errorf("query project quota state: %w", err)
	}
	flags := *(*uint16)(unsafe.Pointer(&buf[2]))
	if flags&fsQuotaPdqAcct == 0 {
		return fmt.Errorf("project quota accounting is off (ext4: mkfs -O quota,project; xfs: mount -o prjquota): %w", ErrQuotaNotEnforced)
	}
	if flags&fsQuotaPdqEnfd == 0 {
		return fmt.Errorf("project quota is accounted but not enforced (mount with -o prjquota): %w", ErrQuotaNotEnforced)
	}
	return nil
}

func (k *kernelQuota) setProject(dirfd int, project uint32) error {
	a, err := getFsxattr(dirfd)
	if err != nil {
		return err
	}
	a.Projid = project
	a.Xflags |= fsXflagProjinherit
	return setFsxattr(dirfd, &a)
}

func (k *kernelQuota) project(fd int) (uint32, error) {
	a, err := getFsxattr(fd)
	return a.Projid, err
}

func (k *kernelQuota) setLimits(project uint32, bytes, inodes uint64) error {
	var err error
	if k.xfs {
		q := fsDiskQuota{
			Version:      fsDquotVersion,
			Flags:        fsProjQuota,
			Fieldmask:    fsDqBhard | fsDqIhard,
			ID:           project,
			BlkHardlimit: (bytes + xfsBBSize - 1) / xfsBBSize,
			InoHardlimit: inodes,
		}
		err = quotactlFD(k.fd, qcmd(qXSetQLim, prjQuota), project, unsafe.Pointer(&q))
	} else {
		q := ifDqblk{
			BHardlimit: (bytes + qifDqblkSize - 1) / qifDqblkSize,
			IHardlimit: inodes,
			Valid:      qifBlimits | qifIlimits,
		}
		err = quotactlFD(k.fd, qcmd(qSetQuota, prjQuota), project, unsafe.Pointer(&q))
	}
	if err != nil {
		return fmt.Errorf("set quota limits of project %d: %w", project, err)
	}
	return nil
}

func (k *kernelQuota) usage(project uint32) (quotaUsage, error) {
	if k.xfs {
		var q fsDiskQuota
		err := quotactlFD(k.fd, qcmd(qXGetQuota, prjQuota), project, unsafe.Pointer(&q))
		if errors.Is(err, unix.ENOENT) { // xfs has no dquot for a project with no usage and no limits
			return quotaUsage{}, nil
		}
		if err != nil {
			return quotaUsage{}, fmt.Errorf("get quota of project %d: %w", project, err)
		}
		return quotaUsage{
			Bytes: q.Bcount * xfsBBSize, Inodes: q.Icount,
			BytesLimit: q.BlkHardlimit * xfsBBSize, InodesLimit: q.InoHardlimit,
		}, nil
	}
	var q ifDqblk
	if err := quotactlFD(k.fd, qcmd(qGetQuota, prjQuota), project, unsafe.Pointer(&q)); err != nil {
		return quotaUsage{}, fmt.Errorf("get quota of project %d: %w", project, err)
	}
	return quotaUsage{
		Bytes: q.CurSpace, Inodes: q.CurInodes,
		BytesLimit: q.BHardlimit * qifDqblkSize, InodesLimit: q.IHardlimit,
	}, nil
}

func (k *kernelQuota) usedProjects() (map[uint32]bool, error) {
	used := map[uint32]bool{}
	id := uint32(0)
	for {
		var next uint32
		var err error
		if k.xfs {
			var q fsDiskQuota
			err = quotactlFD(k.fd, qcmd(qXGetNextQuota, prjQuota), id, unsafe.Pointer(&q))
			next = q.ID
		} else {
			var q ifNextDqblk
			err = quotactlFD(k.fd, qcmd(qGetNextQuota, prjQuota), id, unsafe.Pointer(&q))
			next = q.ID
		}
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
			return used, nil
		}
		if err != nil {
			return nil, fmt.Errorf("enumerate project quotas from %d: %w", id, err)
		}
		if next < id {
			return nil, fmt.Errorf("enumerate project quotas: kernel returned %d after asking from %d", next, id)
		}
		used[next] = true
		if next == ^uint32(0) {
			return used, nil
		}
		id = next + 1
	}
}
