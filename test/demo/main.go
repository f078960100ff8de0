// Command demo is `make demo-vm`, the VM-only demo: it starts one virt
// node (a QEMU TCG machine with nested SVM, docs/testing.md), boots a Linux
// guest inside it with `hpcvm vm run`, prints the guest's console and the
// VMM's exit status, and tears the node down.
//
// hpcvm's main job, `make demo`, runs `sbatch --vm-image` on a Slurm lab
// of virt nodes instead (test/lab/demo).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

func main() {
	cache := virtnode.CacheDir()
	bin := flag.String("hpcvm", "bin/hpcvm", "hpcvm binary (host path, visible in the node through 9p)")
	kernel := flag.String("kernel", filepath.Join(cache, "guest", "bzImage"), "guest kernel")
	initrd := flag.String("initrd", filepath.Join(cache, "guest", "test-initramfs.cpio.gz"), "guest initramfs")
	cpus := flag.Int("cpus", 2, "guest vCPUs")
	mem := flag.String("mem", "256MiB", "guest memory")
	flag.Parse()

	abs, err := filepath.Abs(*bin)
	if err != nil {
		fatal(err)
	}
	for _, f := range []string{abs, *kernel, *initrd} {
		if _, err := os.Stat(f); err != nil {
			fatal(fmt.Errorf("%v (run `make build guest-kernel guest-initramfs` first)", err))
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()

	fmt.Println("demo: starting a virt node (QEMU TCG, emulated AMD-V; KVM is real inside it)...")
	c, err := virtnode.Start(ctx, virtnode.Config{Nodes: 1, CPUs: 2, MemMiB: 2048, Logf: func(f string, a ...any) { fmt.Printf("demo: "+f+"\n", a...) }})
	if err != nil {
		fatal(err)
	}
	defer c.Close()
	n := c.Nodes[0]
	cmd := fmt.Sprintf("%s vm run --kernel %s --initrd %s --cpus %d --mem %s --cmdline 'console=ttyS0 panic=-1 quiet hpcvm.hostname=demo-guest'",
		abs, *kernel, *initrd, *cpus, *mem)
	fmt.Printf("demo: inside %s: %s\n\n", n.Name, cmd)
	start := time.Now()
	r, err := n.Run(ctx, cmd+" 2>&1; echo \"[hpcvm exit status $?]\"")
	if err != nil {
		fatal(fmt.Errorf("running the VM in %s: %w", n.Name, err))
	}
	fmt.Print(r.Stdout)
	fmt.Printf("\ndemo: guest ran for %v (nested under TCG emulation: ~10-50x slower than hardware)\n", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(r.Stdout, "[hpcvm exit status 0]") {
		fatal(fmt.Errorf("the guest did not power off cleanly"))
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "demo: %v\n", err)
	os.Exit(1)
}
