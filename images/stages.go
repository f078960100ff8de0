package images

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// basePackages are added to every image: an init (systemd), the tools
// that make the initramfs inside the image (zstd: initramfs-tools' default
// compressor, else it falls back to gzip), and e2fsprogs for fsck.
var basePackages = []string{"systemd-sysv", "udev", "kmod", "initramfs-tools", "zstd", "e2fsprogs"}

// initramfsModules are the modules the VMM's devices need before the root
// filesystem is mounted; Debian's cloud kernel has them as modules.
var initramfsModules = []string{"virtio_mmio", "virtio_blk", "virtio_pci", "ext4", "vsock", "vmw_vsock_virtio_transport"}

// AgentPath is where the agent binary is installed in images.
const AgentPath = "/usr/sbin/hpcvm-agent"

// DefaultStages is the Debian build: debootstrap, configure, packages
// (kernel included, which makes the initramfs), kernel (checks and copies
// it out), cleanup, mkfs.
func DefaultStages() []Stage {
	return []Stage{
		{"debootstrap", stageDebootstrap},
		{"configure", stageConfigure},
		{"packages", stagePackages},
		{"kernel", stageKernel},
		{"cleanup", stageCleanup},
		{"mkfs", stageMkfs},
	}
}

func stageDebootstrap(ctx context.Context, env *BuildEnv) error {
	if _, err := os.Stat("/usr/sbin/debootstrap"); err != nil {
		return fmt.Errorf("debootstrap is not installed (apt-get install debootstrap): %w", err)
	}
	b := env.Def.Base
	args := []string{"debootstrap",
		"--variant=" + b.Variant,
		"--components=" + strings.Join(b.Components, ","),
		"--include=" + strings.Join(basePackages, ","),
	}
	if env.CacheDir != "" {
		dir := filepath.Join(env.CacheDir, "debootstrap", b.Suite)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		args = append(args, "--cache-dir="+dir)
	}
	args = append(args, b.Suite, env.Rootfs, b.Mirror)
	// debootstrap mounts /proc and /sys in the target itself; isolated, a
	// kill can leave neither mounts nor processes behind.
	return runCmd(ctx, env, true, strings.Join(args, " "), append([]string{"/bin/sh", "-c", pid1Script, "sh"}, args...)...)
}

// write creates a file in the rootfs (parents 0755).
func (env *BuildEnv) write(path string, content []byte, mode os.FileMode) error {
	p := filepath.Join(env.Rootfs, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	os.Remove(p) // replace symlinks (e.g. resolv.conf) instead of following them
	if err := os.WriteFile(p, content, mode); err != nil {
		return err
	}
	return os.Chmod(p, mode) // umask-independent
}

func agentUnit(port uint32) string {
	return fmt.Sprintf(`[Unit]
Description=hpcvm guest agent (vsock port %d)
Documentation=https://github.com/hpcvm/hpcvm/blob/main/docs/agent.md
# Early: jobs need nothing but the root filesystem, and the host waits for
# the agent to know the guest is up. After tmpfiles-setup: its "D /tmp" rule
# empties /tmp, where the host may already have staged a job's files.
DefaultDependencies=no
After=systemd-remount-fs.service systemd-modules-load.service systemd-tmpfiles-setup.service
Wants=systemd-modules-load.service
Before=shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=%s --port %d
Restart=always
RestartSec=1
# The agent runs job commands: do not kill them with the agent on restart.
KillMode=process

[Install]
WantedBy=sysinit.target
`, port, AgentPath, port)
}

func stageConfigure(ctx context.Context, env *BuildEnv) error {
	d := env.Def
	files := []struct {
		path, content string
		mode          os.FileMode
	}{
		{"/etc/hostname", d.Name + "\n", 0o644},
		{"/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t" + d.Name + "\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644},
		{"/etc/fstab", "# hpcvm: the VMM's first virtio disk is the root filesystem\n/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n", 0o644},
		{"/etc/initramfs-tools/modules", "# hpcvm: drivers for the VMM's devices, needed before / is mounted\n" + strings.Join(initramfsModules, "\n") + "\n", 0o644},
		{"/etc/modules-load.d/hpcvm.conf", "vmw_vsock_virtio_transport\n", 0o644},
		{"/etc/systemd/system/hpcvm-agent.service", agentUnit(d.Agent.Port), 0o644},
		// No services may start inside the build chroot.
		{"/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755},
		// Images have no network by default; jobs talk to the host over vsock.
		{"/etc/apt/apt.conf.d/90hpcvm", "APT::Install-Recommends \"false\";\nAPT::Install-Suggests \"false\";\n", 0o644},
	}
	for _, f := range files {
		if err := env.write(f.path, []byte(f.content), f.mode); err != nil {
			return err
		}
	}
	// DNS for apt-get during the build only; cleanup removes it.
	if rc, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		if err := env.write("/etc/resolv.conf", rc, 0o644); err != nil {
			return err
		}
	}
	agent, err := os.ReadFile(env.Agent)
	if err != nil {
		return err
	}
	if err := env.write(AgentPath, agent, 0o755); err != nil {
		return err
	}
	links := map[string]string{
		"/etc/systemd/system/sysinit.target.wants/hpcvm-agent.service": "/etc/systemd/system/hpcvm-agent.service",
		// Timers that would run apt in a job's VM.
		"/etc/systemd/system/apt-daily.timer":         "/dev/null",
		"/etc/systemd/system/apt-daily-upgrade.timer": "/dev/null",
	}
	for link, target := range links {
		p := filepath.Join(env.Rootfs, link)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		os.Remove(p)
		if err := os.Symlink(target, p); err != nil {
			return err
		}
	}
	for _, f := range d.Files {
		content := []byte(f.Content)
		if f.Source != "" {
			if content, err = os.ReadFile(d.SourcePath(f)); err != nil {
				return fmt.Errorf("files %s: %w", f.Path, err)
			}
		}
		mode, _ := ParseMode(f.Mode) // validated by Parse
		if err := env.write(f.Path, content, mode); err != nil {
			return err
		}
		if err := os.Lchown(filepath.Join(env.Rootfs, f.Path), int(f.UID), int(f.GID)); err != nil {
			return err
		}
		if err := os.Chmod(filepath.Join(env.Rootfs, f.Path), mode); err != nil { // after chown: it clears setuid
			return err
		}
	}
	return nil
}

func stagePackages(ctx context.Context, env *BuildEnv) error {
	if err := env.Chroot(ctx, "apt-get", "update", "-q"); err != nil {
		return err
	}
	pkgs := append([]string{env.Def.Kernel.Package}, env.Def.Packages...)
	args := append([]string{"apt-get", "install", "-y", "-q", "--no-install-recommends"}, pkgs...)
	return env.Chroot(ctx, args...)
}

// stageKernel finds the installed kernel, makes sure its initramfs (made
// by the kernel package's hook with the image's own update-initramfs) has
// the VMM's drivers, and copies both out as artifacts.
func stageKernel(ctx context.Context, env *BuildEnv) error {
	ks, err := filepath.Glob(filepath.Join(env.Rootfs, "boot", "vmlinuz-*"))
	if err != nil {
		return err
	}
	if len(ks) != 1 {
		return fmt.Errorf("want exactly one kernel in /boot, found %d: %v", len(ks), ks)
	}
	ver := strings.TrimPrefix(filepath.Base(ks[0]), "vmlinuz-")
	env.Manifest.KernelVersion = ver
	initrd := filepath.Join(env.Rootfs, "boot", "initrd.img-"+ver)
	if _, err := os.Stat(initrd); err != nil || !initrdHasModules(ctx, env, ver) {
		if err := env.Chroot(ctx, "update-initramfs", "-c", "-k", ver); err != nil {
			os.Remove(initrd)
			if err := env.Chroot(ctx, "update-initramfs", "-c", "-k", ver); err != nil {
				return err
			}
		}
		if !initrdHasModules(ctx, env, ver) {
			return fmt.Errorf("initrd.img-%s lacks one of %v after update-initramfs", ver, initramfsModules)
		}
	}
	if err := copyFile(ks[0], filepath.Join(env.Dir, KernelFile)); err != nil {
		return err
	}
	return copyFile(initrd, filepath.Join(env.Dir, InitrdFile))
}

// initrdHasModules lists the initramfs with the image's own lsinitramfs.
func initrdHasModules(ctx context.Context, env *BuildEnv, ver string) bool {
	out := filepath.Join(env.Dir, "lsinitramfs.txt")
	defer os.Remove(out)
	f, err := os.Create(out)
	if err != nil {
		return false
	}
	logw := env.Log
	env.Log = f
	err = env.Chroot(ctx, "lsinitramfs", "/boot/initrd.img-"+ver)
	env.Log = logw
	f.Close()
	if err != nil {
		return false
	}
	b, _ := os.ReadFile(out)
	// Drivers built into the kernel need no module.
	builtin, _ := os.ReadFile(filepath.Join(env.Rootfs, "lib/modules", ver, "modules.builtin"))
	for _, m := range initramfsModules {
		ko := "/" + m + ".ko"
		if !strings.Contains(string(b), ko) && !strings.Contains(string(builtin), ko) {
			fmt.Fprintf(env.Log, "initramfs of %s has no %s.ko\n", ver, m)
			return false
		}
	}
	return true
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func stageCleanup(ctx context.Context, env *BuildEnv) error {
	if err := env.Chroot(ctx, "apt-get", "clean"); err != nil {
		return err
	}
	for _, p := range []string{"/usr/sbin/policy-rc.d", "/etc/resolv.conf"} {
		if err := os.Remove(filepath.Join(env.Rootfs, p)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	lists, _ := filepath.Glob(filepath.Join(env.Rootfs, "var/lib/apt/lists/*_*"))
	for _, l := range lists {
		os.Remove(l)
	}
	// Empty machine-id: systemd makes a fresh one at every boot of a
	// read-only image, and each VM of the image differs.
	if err := env.write("/etc/machine-id", nil, 0o444); err != nil {
		return err
	}
	os.Remove(filepath.Join(env.Rootfs, "var/lib/dbus/machine-id"))
	// The kernel and initramfs are artifacts outside the disk; keeping
	// them in /boot too lets the image rebuild its own initramfs.
	return nil
}

func stageMkfs(ctx context.Context, env *BuildEnv) error {
	disk := filepath.Join(env.Dir, DiskFile)
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	// Sparse: Truncate allocates nothing; mkfs writes only what it needs.
	if err := f.Truncate(int64(env.Def.DiskSize)); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := env.Run(ctx, "mkfs.ext4", "-q", "-F", "-L", "hpcvm-root", "-d", env.Rootfs, disk); err != nil {
		return fmt.Errorf("%w (is disk_size %d bytes big enough for the tree?)", err, env.Def.DiskSize)
	}
	return nil
}
