#!/bin/bash
# Build an hpcvm guest initramfs: busybox-static (+ applet symlinks),
# hpcvm-testguest (static Go, CGO_ENABLED=0) and guest/initramfs/init.
#
#   guest/initramfs/build.sh OUT.cpio.gz [EXTRA_ROOT_DIR]
#
# EXTRA_ROOT_DIR is copied over the root (the cloud kernel adds its modules
# and /etc/hpcvm/modules there). The archive is rebuilt only when the hash of
# its inputs (binaries, init, this script, extra dir) changes; it is
# reproducible (sorted, mtime 0, gzip -n).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: build.sh OUT.cpio.gz [EXTRA_ROOT_DIR]}
extra=${2:-}
cache=${HPCVM_CACHE:-$HOME/.cache/hpcvm}
work=$cache/guest/initramfs-work
busybox=${BUSYBOX:-/bin/busybox}

die() { echo "guest-initramfs: $*" >&2; exit 1; }
[ -x "$busybox" ] && file -L "$busybox" | grep -q 'statically linked' ||
	die "$busybox is not a static busybox: apt-get install busybox-static"

mkdir -p "$work" "$(dirname "$out")"
exec 9>"$work/.lock"
flock 9

# The Go build is cached by go itself: a no-op rebuild takes well under a second.
tg=$work/hpcvm-testguest
(cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -ldflags='-s -w' -o "$tg.new" ./guest/testguest)
mv -f "$tg.new" "$tg"

key=$( {
	sha256sum "$busybox" "$tg" "$here/init" "$0" | cut -d' ' -f1
	[ -z "$extra" ] || (cd "$extra" && find . -printf '%p %m %l\n' | sort && find . -type f -print0 | sort -z | xargs -0r sha256sum)
} | sha256sum | cut -c1-16)

if [ -f "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then
	echo "guest-initramfs: up to date ($key): $out"
	exit 0
fi

root=$work/root
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,disk,root,etc/hpcvm,usr}
ln -s bin "$root/sbin"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
cp "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do
	[ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
done
cp "$tg" "$root/bin/hpcvm-testguest"
cp "$here/init" "$root/init"
chmod 0755 "$root/init" "$root/bin/busybox" "$root/bin/hpcvm-testguest"
chmod 1777 "$root/tmp"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
[ -z "$extra" ] || cp -a "$extra/." "$root/"

# The kernel creates /dev/console itself only with devtmpfs; make sure the
# early console exists before /init runs (needs root for mknod).
mknod -m 600 "$root/dev/console" c 5 1

(cd "$root" && find . -mindepth 1 -print0 | sort -z | xargs -0 touch -h -d @0 &&
	find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n > "$out.tmp"
mv -f "$out.tmp" "$out"
echo "$key" > "$out.key"
echo "guest-initramfs: $out ($(stat -c %s "$out") bytes, key $key)"
