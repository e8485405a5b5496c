package main

import "runtime/debug"

// version is the build's version, set with
// -ldflags "-X main.version=v1.2.3" (the Makefile does). It is the one
// package-level variable: the linker can only set variables.
var version string

// buildVersion is the version GetPluginInfo and --version report: the one
// the linker set, else the module version or VCS revision Go recorded,
// else "devel".
func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	rev, dirty := "", false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "devel"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return "devel-" + rev
}
