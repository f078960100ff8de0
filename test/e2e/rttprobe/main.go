// Command rttprobe measures the TCP round trip of a 4 KiB message between
// two virt nodes: the reference a page hand-off between slices on those
// nodes is compared with (test/e2e, TestSlicesAcrossNodes).
//
//	rttprobe -listen :7800              echo 4 KiB messages back
//	rttprobe -connect HOST:7800 -n 500  print {"median_us":..,"p99_us":..}
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"
)

const msgSize = 4096

func main() {
	listen := flag.String("listen", "", "serve on `ADDR`")
	connect := flag.String("connect", "", "measure against `ADDR`")
	n := flag.Int("n", 500, "round trips to time")
	flag.Parse()
	var err error
	switch {
	case *listen != "":
		err = serve(*listen)
	case *connect != "":
		err = measure(*connect, *n)
	default:
		err = fmt.Errorf("want -listen or -connect")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "rttprobe:", err)
		os.Exit(1)
	}
}

func serve(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	buf := make([]byte, msgSize)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
}

func measure(addr string, n int) error {
	var c net.Conn
	var err error
	for deadline := time.Now().Add(30 * time.Second); ; {
		if c, err = net.Dial("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, msgSize)
	var d []time.Duration
	for i := 0; i < n+20; i++ {
		start := time.Now()
		if _, err := c.Write(buf); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if i >= 20 { // warm-up excluded
			d = append(d, time.Since(start))
		}
	}
	slices.Sort(d)
	return json.NewEncoder(os.Stdout).Encode(map[string]int64{
		"median_us": d[len(d)/2].Microseconds(), "p99_us": d[len(d)*99/100].Microseconds()})
}
