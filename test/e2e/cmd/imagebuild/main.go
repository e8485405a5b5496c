// Command imagebuild builds the ploop-csi container image without a Docker
// daemon (internal/containerimage) and writes it as an OCI image layout
// tarball for `ctr -n k8s.io images import`. It prints
// the image's manifest digest. `make image` runs it.
//
// The time stamped on every file is $SOURCE_DATE_EPOCH, else the last
// commit's time, so building the same commit again gives the same digest
// (as long as Debian serves the same package versions).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ploop-csi/ploop-csi/internal/containerimage"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "imagebuild:", err)
		os.Exit(1)
	}
}

func run() error {
	out := flag.String("o", "bin/ploop-csi-image.tar", "the OCI layout tarball to write")
	version := flag.String("version", "", "the version to stamp (default: git describe --tags --always --dirty)")
	revision := flag.String("revision", "", "the revision label (default: git rev-parse HEAD)")
	ref := flag.String("ref", "", "the image name containerd gives it (default: docker.io/ploop-csi/ploop-csi:VERSION)")
	cache := flag.String("cache", containerimage.DefaultCacheDir(), "where downloaded .deb files are kept")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	root, err := git(ctx, ".", "rev-parse", "--show-toplevel")
	if err != nil {
		return fmt.Errorf("find the module's root (run inside the checkout): %w", err)
	}
	if *version == "" {
		if *version, err = git(ctx, root, "describe", "--tags", "--always", "--dirty"); err != nil {
			return err
		}
	}
	if *revision == "" {
		if *revision, err = git(ctx, root, "rev-parse", "HEAD"); err != nil {
			return err
		}
	}
	if *ref == "" {
		*ref = "docker.io/ploop-csi/ploop-csi:" + *version
	}
	created, err := sourceDate(ctx, root)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(*out), 0o755); err != nil {
		return fmt.Errorf("create the output directory: %w", err)
	}
	res, err := containerimage.Build(ctx, containerimage.Options{
		ModuleDir: root, Version: *version, Revision: *revision, Created: created,
		CacheDir: *cache, Ref: *ref,
		Logf: func(f string, a ...any) { fmt.Fprintf(os.Stderr, "imagebuild: "+f+"\n", a...) },
	}, *out)
	if err != nil {
		return err
	}
	st, err := os.Stat(*out)
	if err != nil {
		return err
	}
	fmt.Printf("%s %s (%d bytes, %s)\n", *out, res.Digest, st.Size(), *ref)
	return nil
}

// sourceDate is $SOURCE_DATE_EPOCH (the reproducible-builds convention),
// else the last commit's time.
func sourceDate(ctx context.Context, root string) (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		var err error
		if s, err = git(ctx, root, "log", "-1", "--format=%ct"); err != nil {
			return time.Time{}, err
		}
	}
	secs, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("source date %q: %w", s, err)
	}
	return time.Unix(secs, 0).UTC(), nil
}

func git(ctx context.Context, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = strings.TrimSpace(string(ee.Stderr))
		}
		return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, stderr)
	}
	return strings.TrimSpace(string(out)), nil
}
