package server

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	os.Mkdir(bin, 0o755)
	os.WriteFile(filepath.Join(bin, "tool"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(bin, "data"), []byte("x"), 0o644)
	tests := []struct {
		name, argv0 string
		env         []string
		want        string
		err         error
	}{
		{"in PATH", "tool", []string{"PATH=/nonexistent:" + bin}, filepath.Join(bin, "tool"), nil},
		{"first PATH wins as with getenv", "tool", []string{"PATH=" + bin, "PATH=/x"}, filepath.Join(bin, "tool"), nil},
		{"relative PATH entry is relative to dir", "tool", []string{"PATH=bin"}, filepath.Join(dir, "bin", "tool"), nil},
		{"not in PATH", "tool", []string{"PATH=/nonexistent"}, "", fs.ErrNotExist},
		{"no PATH", "tool", nil, "", fs.ErrNotExist},
		{"relative with slash", "bin/tool", nil, filepath.Join(dir, "bin", "tool"), nil},
		{"absolute", filepath.Join(bin, "tool"), nil, filepath.Join(bin, "tool"), nil},
		{"not executable", filepath.Join(bin, "data"), nil, filepath.Join(bin, "data"), fs.ErrPermission},
		{"directory", bin, nil, bin, fs.ErrPermission},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := lookPath(tc.argv0, tc.env, dir)
			if !errors.Is(err, tc.err) || (tc.err == nil && err != nil) || got != tc.want {
				t.Fatalf("lookPath(%q) = %q, %v; want %q, %v", tc.argv0, got, err, tc.want, tc.err)
			}
		})
	}
}

func TestErrCode(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{&fs.PathError{Err: fs.ErrNotExist}, proto.CodeNotFound},
		{syscall.ENOENT, proto.CodeNotFound},
		{syscall.EACCES, proto.CodePermission},
		{syscall.EPERM, proto.CodePermission},
		{syscall.EBUSY, proto.CodeBusy},
		{syscall.EINVAL, proto.CodeInvalid},
		{errors.New("other"), proto.CodeInternal},
	}
	for _, tc := range tests {
		if got := errCode(tc.err); got != tc.want {
			t.Errorf("errCode(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}
