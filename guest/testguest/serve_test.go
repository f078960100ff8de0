package main

import (
	"bufio"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func pipe(t *testing.T, h func(net.Conn)) net.Conn {
	t.Helper()
	a, b := net.Pipe()
	go func() {
		defer b.Close()
		h(b)
	}()
	t.Cleanup(func() { a.Close() })
	return a
}

func TestEcho(t *testing.T) {
	c := pipe(t, (&Server{}).Echo)
	go io.WriteString(c, "abc\n")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "abc\n" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
}

func TestGreet(t *testing.T) {
	c := pipe(t, (&Server{Hostname: "node7"}).Greet)
	r := bufio.NewReader(c)
	for range 2 {
		go io.WriteString(c, "hi\n")
		l, err := r.ReadString('\n')
		if err != nil || l != Greeting+" node7\n" {
			t.Fatalf("greet = %q, %v", l, err)
		}
	}
}

func TestControl(t *testing.T) {
	stop := filepath.Join(t.TempDir(), "stop")
	c := pipe(t, (&Server{StopFile: stop}).Control)
	r := bufio.NewReader(c)
	ask := func(cmd string) string {
		go io.WriteString(c, cmd+"\n")
		l, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		return l
	}
	if l := ask("ping"); l != "pong\n" {
		t.Errorf("ping = %q", l)
	}
	if l := ask("facts"); !strings.HasPrefix(l, "nproc=") || !strings.Contains(l, "memtotal_kb=") {
		t.Errorf("facts = %q", l)
	}
	if l := ask("run echo out; echo err >&2; exit 3"); l != "OUT 8\n" {
		t.Errorf("run header = %q", l)
	}
	body := make([]byte, 8)
	io.ReadFull(r, body)
	if string(body) != "out\nerr\n" {
		t.Errorf("run output = %q", body)
	}
	if l, _ := r.ReadString('\n'); l != "EXIT 3\n" {
		t.Errorf("run status = %q", l)
	}
	if l := ask("bogus"); !strings.HasPrefix(l, "ERR") {
		t.Errorf("bogus = %q", l)
	}
	if l := ask("stop"); l != "OK stopping\n" {
		t.Errorf("stop = %q", l)
	}
	if _, err := os.Stat(stop); err != nil {
		t.Errorf("stop file: %v", err)
	}
}
