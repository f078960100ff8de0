package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/images"
)

func fakeImage(t *testing.T, store, name string) {
	t.Helper()
	s, err := images.OpenStore(store)
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.Begin(name)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{images.DiskFile, images.KernelFile, images.InitrdFile} {
		os.WriteFile(filepath.Join(st.Dir(), a), []byte(a), 0o644)
	}
	if err := st.Commit(context.Background(), &images.Manifest{Version: "1"}, images.DiskFile, images.KernelFile, images.InitrdFile); err != nil {
		t.Fatal(err)
	}
}

func TestImageCommands(t *testing.T) {
	store := t.TempDir()
	fakeImage(t, store, "img")
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"list", "--store", store}, 0},
		{[]string{"inspect", "--store", store, "img"}, 0},
		{[]string{"inspect", "--store", store, "nope"}, 1},
		{[]string{"verify", "--store", store, "img"}, 0},
		{[]string{"inspect", "--store", store}, 2},
		{[]string{"frobnicate"}, 2},
		{[]string{"build", "--store", store, "no-such-definition"}, 1},
		{[]string{"rm", "--store", store, "img"}, 0},
		{[]string{"rm", "--store", store, "img"}, 1},
	}
	for _, tc := range tests {
		if got := imageMain(tc.args); got != tc.want {
			t.Errorf("hpcvm image %s: exit %d, want %d", strings.Join(tc.args, " "), got, tc.want)
		}
	}
	if ents, _ := os.ReadDir(store); len(ents) != 1 || !strings.HasSuffix(ents[0].Name(), ".lock") {
		t.Errorf("store after rm holds %v", ents)
	}
}

func TestImageVerifyDetectsCorruption(t *testing.T) {
	store := t.TempDir()
	fakeImage(t, store, "img")
	os.WriteFile(filepath.Join(store, "img", images.InitrdFile), []byte("changed"), 0o644)
	if got := imageMain([]string{"verify", "--store", store, "img"}); got != 1 {
		t.Fatalf("verify of a corrupted image: exit %d, want 1", got)
	}
}

func TestFindDefinition(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "deb.toml"), nil, 0o644)
	tests := []struct {
		arg, defs, want string
		ok              bool
	}{
		{"deb", dir, filepath.Join(dir, "deb.toml"), true},
		{"other", dir, "", false},
		{"x/y.toml", dir, "x/y.toml", true},
		{"z.toml", "", "z.toml", true},
		{"Bad Name", dir, "", false},
	}
	for _, tc := range tests {
		got, err := findDefinition(tc.arg, tc.defs)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("findDefinition(%q, %q) = %q, %v", tc.arg, tc.defs, got, err)
		}
	}
}

func TestProgressLine(t *testing.T) {
	var buf bytes.Buffer
	p := &progressLine{w: &buf}
	p.Stage(2, 6, "configure")
	p.Bytes(3 << 20)
	p.Write([]byte("a log line\n"))
	p.clear()
	out := buf.String()
	for _, want := range []string{"[2/6] configure", "3.0 MiB", "\r\033[Ka log line\n", "\r\033[K[2/6] configure 3.0 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("progress output %q lacks %q", out, want)
		}
	}
	if !strings.HasSuffix(out, "\r\033[K") {
		t.Errorf("clear did not erase the status line: %q", out)
	}
}
