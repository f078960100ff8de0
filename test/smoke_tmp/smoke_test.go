package smoke

import (
	"context"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

func TestSmoke(t *testing.T) {
	c := virtnode.StartT(t, virtnode.Config{Nodes: 1, CPUs: 1, MemMiB: 2048})
	n := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	r, err := n.Run(ctx, "ls -la /dev/kvm; timeout 60 /work/main/bin/hpcvm vm run -v --kernel /root/.cache/hpcvm/node/current/vmlinuz --mem 256MiB --cmdline 'console=ttyS0 panic=-1 earlyprintk=ttyS0' 2>&1 | tail -60; echo EXIT=$?")
	t.Logf("err=%v\n%s", err, r)
}
