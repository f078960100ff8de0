package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/hpcvm/hpcvm/images"
)

// LabPolicy is the lab's site policy: the images tests and the demo use,
// a rule refusing "forbidden*" images, a default memory size and the VMM
// cgroup limits.
const LabPolicy = `# hpcvm lab site policy (test/lab)
[defaults]
images.allow = ["debian12", "tiny", "fake", "fake-*"]

[defaults.limits]
max_nodes = 8
default_mem_per_node = "512MiB"
max_mem_per_node = "8GiB"
vmm_mem_reserve_per_node = "128MiB"

[defaults.cgroup]
pids_max = 4096

[[rule]]
name = "no-forbidden"
images.deny = ["forbidden*"]
`

// WritePolicy writes LabPolicy into dir/10-lab.toml.
func WritePolicy(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "10-lab.toml"), []byte(LabPolicy), 0o644)
}

// WriteFakeImage publishes an image for the fake VMM in store: a dummy
// kernel, a small disk, and cmdline (fakevmm.* keys).
func WriteFakeImage(store, name, cmdline string) error {
	dir := filepath.Join(store, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	m := images.Manifest{Schema: images.ManifestSchema, Name: name, Version: "test", Cmdline: cmdline,
		AgentPort: 1024, Created: time.Now().UTC()}
	for _, a := range []struct {
		file string
		size int64
	}{{images.KernelFile, 4096}, {images.DiskFile, 1 << 20}} {
		if err := os.WriteFile(filepath.Join(dir, a.file), make([]byte, a.size), 0o644); err != nil {
			return err
		}
		m.Artifacts = append(m.Artifacts, images.Artifact{Name: a.file, Size: a.size})
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, images.ManifestFile), b, 0o644)
}

// BuildFakeVMM builds test/lab/fakevmm into dir and returns its path.
func BuildFakeVMM(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "fakevmm")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./test/lab/fakevmm")
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building fakevmm: %v\n%s", err, b)
	}
	return out, nil
}
