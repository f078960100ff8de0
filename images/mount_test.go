package images

import "golang.org/x/sys/unix"

func mountTmpfs(p string) error { return unix.Mount("tmpfs", p, "tmpfs", 0, "size=1m") }
func unmount(p string) error    { return unix.Unmount(p, unix.MNT_DETACH) }
