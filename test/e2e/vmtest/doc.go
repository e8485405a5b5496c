// Package vmtest runs tests against a real Linux kernel that has what this
// machine's kernel lacks (the nbd driver, project quota).
//
// The model: the host downloads Debian's stock kernel package once (cached by
// kernel version and initramfs recipe), builds a tiny busybox initramfs that
// loads the modules the tests need, and boots the uncompressed kernel under
// qemu-system-x86_64 (KVM when /dev/kvm is usable and not kvm_pvm, TCG
// otherwise; about 5 s to the command under TCG on an idle 2-core machine).
// The guest mounts the host's root file system read-only over 9p, puts tmpfs
// on /tmp, /run and /var/tmp, and chroots into it, so every host binary —
// including Go test binaries built on the host — runs unchanged as root
// against the guest kernel. A second, writable 9p share
// (the exchange directory) appears at the same absolute path on both sides and
// carries binaries in and results out. The guest command's exit status comes
// back as a marker line on the serial console.
//
// A package with kernel tests writes one host-level test that calls Run with a
// list of Cases: on the host Run boots one VM and re-runs the same test binary
// inside it; inside the guest (PLOOP_CSI_IN_VM=1) Run executes the cases as
// subtests. Exec is the lower-level entry point (used by cmd/vmrun) that runs
// any command in the guest.
//
// Environment: PLOOP_CSI_SKIP_VM=1 lets a developer without qemu skip VM tests
// (ignored when CI=true); PLOOP_CSI_VM_ACCEL (kvm|tcg), PLOOP_CSI_VM_MEM (MiB)
// and PLOOP_CSI_VM_CPUS tune the machine; PLOOP_CSI_CACHE moves the cache;
// PLOOP_CSI_VM_DEBUG=1 shows the boot console; PLOOP_CSI_VM_ROOTCACHE=none
// turns off the guest's caching of the (read-only) host root.
package vmtest
