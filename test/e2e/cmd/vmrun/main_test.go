package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestUsage(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want int
		msg  string
	}{
		{"no command", nil, 2, "usage: vmrun"},
		{"help", []string{"-help"}, 0, "usage: vmrun"},
		{"bad flag", []string{"-nope", "--", "true"}, 2, "flag provided but not defined"},
		{"bad accel", []string{"-accel", "hvf", "--", "true"}, exitHarness, "unknown accelerator"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if got := run(tt.args, &stdout, &stderr); got != tt.want {
				t.Errorf("exit %d, want %d; stderr:\n%s", got, tt.want, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.msg) {
				t.Errorf("stderr lacks %q:\n%s", tt.msg, stderr.String())
			}
		})
	}
}
