package boot

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// symbolsProgram prints the address of one of its functions; built
// unstripped, it is an ELF file with a symbol table like a vmlinux.
const symbolsProgram = `package main

import (
	"fmt"
	"reflect"
)

//go:noinline
func hpcvmSymbolTarget() int { return 42 }

func main() { fmt.Println(reflect.ValueOf(hpcvmSymbolTarget).Pointer()) }
`

// TestSymbolsLookup names a function of a freshly built program from
// addresses inside it.
func TestSymbolsLookup(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		t.Skipf("no Go toolchain at %s to build the test program: %v", goBin, err)
	}
	dir := t.TempDir()
	src, exe := filepath.Join(dir, "main.go"), filepath.Join(dir, "prog")
	if err := os.WriteFile(src, []byte(symbolsProgram), 0o644); err != nil {
		t.Fatal(err)
	}
	build := exec.Command(goBin, "build", "-o", exe, src)
	build.Env = append(os.Environ(), "GOFLAGS=", "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the test program: %v\n%s", err, out)
	}
	out, err := exec.Command(exe).Output()
	if err != nil {
		t.Fatal(err)
	}
	pc, err := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	syms, err := LoadSymbols(exe)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		addr uint64
		want string
	}{
		{pc, "main.hpcvmSymbolTarget+0x0"},
		{pc + 3, "main.hpcvmSymbolTarget+0x3"},
		{1, ""},
	} {
		if got := syms.Lookup(tc.addr); got != tc.want {
			t.Errorf("Lookup(%#x) = %q, want %q", tc.addr, got, tc.want)
		}
	}
}

func TestSymbolsRejectsNonELF(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bzImage")
	if err := os.WriteFile(p, []byte("MZ not an ELF file"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadSymbols(p); err == nil || !strings.Contains(err.Error(), "kernel symbols") {
		t.Errorf("LoadSymbols(non-ELF) = %v, want an error naming kernel symbols", err)
	}
}
