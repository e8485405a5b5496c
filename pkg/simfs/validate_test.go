package simfs

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"pvc-0f1e2d3c-aaaa-bbbb-cccc-1234567890ab", true},
		{"a", true},
		{"A.b_c-9", true},
		{strings.Repeat("x", MaxIDLength), true},
		{"", false},
		{strings.Repeat("x", MaxIDLength+1), false},
		{"a/b", false},
		{"/abs", false},
		{"..", false},
		{".", false},
		{"a..b", false},
		{"../escape", false},
		{".hidden", false},
		{"-flag", false},
		{"sp ace", false},
		{"nul\x00", false},
		{"new\nline", false},
		{"ünï", false},
		{"back\\slash", false},
	}
	for _, tt := range tests {
		err := ValidateID(tt.id)
		if tt.ok && err != nil {
			t.Errorf("ValidateID(%q) = %v, want nil", tt.id, err)
		}
		if !tt.ok && !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidateID(%q) = %v, want ErrInvalid", tt.id, err)
		}
	}
}

func TestValidateLimits(t *testing.T) {
	tests := []struct {
		bytes, inodes uint64
		want          uint64 // 0 = error
	}{
		{1, 1, 4096},
		{4096, 10, 4096},
		{4097, 10, 8192},
		{1 << 30, 1 << 20, 1 << 30},
		{MaxBytes, MaxInodes, MaxBytes},
		{0, 10, 0},
		{10, 0, 0},
		{MaxBytes + 1, 10, 0},
		{1 << 63, 10, 0},
		{^uint64(0), 10, 0},
		{4096, MaxInodes + 1, 0},
	}
	for _, tt := range tests {
		got, err := validateLimits(tt.bytes, tt.inodes)
		if tt.want == 0 {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("validateLimits(%d, %d) = %d, %v; want ErrInvalid", tt.bytes, tt.inodes, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("validateLimits(%d, %d) = %d, %v; want %d", tt.bytes, tt.inodes, got, err, tt.want)
		}
	}
}

func TestDefaultInodes(t *testing.T) {
	for _, tt := range []struct{ bytes, want uint64 }{
		{1, 4096}, {1 << 30, 65536}, {MaxBytes, MaxInodes},
	} {
		if got := DefaultInodes(tt.bytes); got != tt.want {
			t.Errorf("DefaultInodes(%d) = %d, want %d", tt.bytes, got, tt.want)
		}
	}
}

// FuzzValidateID: whatever ValidateID accepts is a single, plain path
// element that stays inside its parent directory.
func FuzzValidateID(f *testing.F) {
	for _, s := range []string{"pvc-1", "", "..", "a/b", ".x", "a..b", "x\x00", strings.Repeat("y", 129)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if ValidateID(id) != nil {
			return
		}
		if id == "" || len(id) > MaxIDLength || strings.ContainsAny(id, "/\\\x00") || strings.Contains(id, "..") ||
			strings.HasPrefix(id, ".") || strings.HasPrefix(id, "-") {
			t.Fatalf("accepted %q", id)
		}
		if filepath.Base(id) != id || filepath.Clean(id) != id || !filepath.IsLocal(id) {
			t.Fatalf("accepted %q, which is not a plain local path element", id)
		}
		joined := filepath.Join("/root", id)
		if filepath.Dir(joined) != "/root" {
			t.Fatalf("%q escapes its parent: %s", id, joined)
		}
	})
}
