// Command hpcvm-testguest is the vsock test server baked into the hpcvm test
// initramfs (see docs/guest.md). It is started by the guest's /init when the
// kernel command line has hpcvm.vsock=1.
//
//	hpcvm-testguest serve [-stop-file F] [-base-port N]   serve the test ports
//	hpcvm-testguest dial CID PORT                          stdin -> vsock -> stdout
//	hpcvm-testguest facts                                   print the machine facts line
//
// Ports (relative to -base-port, default 1024):
//
//	1024 echo:    everything received is sent back.
//	1025 greet:   every line received is answered with "hpcvm-testguest hello from <hostname>".
//	1026 control: line commands ping, facts, run <shell command>, stop (see serve.go).
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/mdlayher/vsock"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "serve":
		os.Exit(serveMain(os.Args[2:]))
	case "dial":
		os.Exit(dialMain(os.Args[2:]))
	case "facts":
		fmt.Println(factsLine())
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: hpcvm-testguest serve [-stop-file F] [-base-port N] | dial CID PORT | facts\n")
	os.Exit(2)
}

func serveMain(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	stopFile := fs.String("stop-file", "/run/hpcvm.stop", "file created when a stop request arrives")
	base := fs.Uint("base-port", 1024, "first vsock port (echo); greet is +1, control +2")
	fs.Parse(args)

	s := &Server{StopFile: *stopFile}
	handlers := []func(net.Conn){s.Echo, s.Greet, s.Control}
	var ports []string
	var wg sync.WaitGroup
	for i, h := range handlers {
		port := uint32(*base) + uint32(i)
		l, err := vsock.Listen(port, nil)
		if err != nil {
			fmt.Printf("HPCVM vsock=error port=%d err=%q\n", port, err.Error())
			return 1
		}
		ports = append(ports, strconv.Itoa(int(port)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveListener(l, h)
		}()
	}
	cid, _ := vsock.ContextID()
	fmt.Printf("HPCVM vsock=ready cid=%d ports=%s\n", cid, strings.Join(ports, ","))
	wg.Wait()
	return 0
}

func serveListener(l net.Listener, h func(net.Conn)) {
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Fprintf(os.Stderr, "hpcvm-testguest: accept: %v\n", err)
			return
		}
		go func() {
			defer c.Close()
			h(c)
		}()
	}
}

func dialMain(args []string) int {
	if len(args) != 2 {
		usage()
	}
	cid, err1 := strconv.ParseUint(args[0], 10, 32)
	port, err2 := strconv.ParseUint(args[1], 10, 32)
	if err1 != nil || err2 != nil {
		usage()
	}
	c, err := vsock.Dial(uint32(cid), uint32(port), nil)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm-testguest: dial %d:%d: %v\n", cid, port, err)
		return 1
	}
	defer c.Close()
	go func() {
		io.Copy(c, os.Stdin)
		c.CloseWrite()
	}()
	if _, err := io.Copy(os.Stdout, c); err != nil {
		fmt.Fprintf(os.Stderr, "hpcvm-testguest: %v\n", err)
		return 1
	}
	return 0
}
