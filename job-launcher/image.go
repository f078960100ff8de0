package launcher

import (
	"fmt"
	"strings"

	"github.com/hpcvm/hpcvm/images"
)

// Image is what a VM boots from.
type Image struct {
	Name      string
	Kernel    string
	Initrd    string
	Disk      string // raw root disk, never written: jobs write to an overlay (or boot it read-only)
	Cmdline   string
	AgentPort uint32
}

// Images finds images by name.
type Images interface {
	Lookup(name string) (Image, error)
}

// StoreImages reads an hpcvm image store (images.Store) without creating or
// locking anything: jobs only read it.
type StoreImages struct{ Dir string }

// Lookup implements Images.
func (s StoreImages) Lookup(name string) (Image, error) {
	st := &images.Store{Dir: s.Dir}
	m, err := st.Get(name)
	if err != nil {
		return Image{}, fmt.Errorf("image %s: %w", name, err)
	}
	img := Image{Name: m.Name, Cmdline: m.Cmdline, AgentPort: m.AgentPort}
	for _, a := range []struct {
		file string
		dst  *string
	}{{images.KernelFile, &img.Kernel}, {images.InitrdFile, &img.Initrd}, {images.DiskFile, &img.Disk}} {
		if _, ok := m.Artifact(a.file); ok {
			*a.dst = st.Path(m.Name, a.file)
		}
	}
	if img.Kernel == "" {
		return Image{}, fmt.Errorf("image %s has no kernel", name)
	}
	if img.AgentPort == 0 {
		img.AgentPort = 1024
	}
	if !strings.Contains(img.Cmdline, "console=") {
		img.Cmdline = strings.TrimSpace(img.Cmdline + " console=ttyS0")
	}
	return img, nil
}
