#!/bin/bash
# Builds the virt-node assets into $HPCVM_CACHE/node/<version>/:
#   vmlinuz             Debian's kernel for the nodes (bzImage)
#   vmlinux             the same kernel decompressed (ELF with PVH note; booted)
#   initramfs.cpio.gz   busybox-static + the modules in node-modules.txt + init.sh
#   root/               the unpacked kernel package (its lib/modules is bind-mounted
#                       into each node, so modprobe works there for anything else)
# and points $HPCVM_CACHE/node/current at that directory.
# Idempotent: the kernel package is downloaded and unpacked once per version,
# the initramfs is rebuilt only when its inputs (this directory, busybox) change.
set -euo pipefail

PKG=linux-image-6.1.0-49-amd64
VER=6.1.174-1
KREL=6.1.0-49-amd64

here=$(cd "$(dirname "$0")" && pwd)
cache=${HPCVM_CACHE:-$HOME/.cache/hpcvm}
out=$cache/node/$VER
mkdir -p "$out"

need() { command -v "$1" >/dev/null || { echo "mkassets: '$1' missing (apt-get install $2)" >&2; exit 1; }; }
need dpkg-deb dpkg
need depmod kmod
need cpio cpio
need gzip gzip
need xz xz-utils
need qemu-system-x86_64 qemu-system-x86
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || {
	if ! dpkg -s busybox-static >/dev/null 2>&1; then
		echo "mkassets: static busybox missing (apt-get install busybox-static)" >&2; exit 1
	fi
}

# 1. Kernel package: one exact version, never a glob.
if [ ! -f "$out/root/.stamp" ]; then
	tmp=$(mktemp -d "$out/dl.XXXXXX") && chmod 755 "$tmp"
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && apt-get download "$PKG=$VER")
	rm -rf "$out/root"
	mkdir -p "$tmp/root"
	dpkg-deb -x "$tmp/${PKG}_${VER}_amd64.deb" "$tmp/root"
	depmod -b "$tmp/root" "$KREL"
	touch "$tmp/root/.stamp"
	mv "$tmp/root" "$out/root"
	rm -rf "$tmp"
	trap - EXIT
fi
cp -f "$out/root/boot/vmlinuz-$KREL" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
# The decompressed ELF kernel carries a PVH note: QEMU then boots it directly,
# skipping the bzImage's self-decompression (which takes seconds under TCG).
if [ ! -s "$out/vmlinux" ] || [ "$out/vmlinux" -ot "$out/vmlinuz" ]; then
	off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$out/vmlinuz" | head -1 | cut -d: -f1)
	[ -n "$off" ] || { echo "mkassets: no XZ payload in vmlinuz" >&2; exit 1; }
	# xz complains about the trailing data after the payload; the ELF is complete.
	tail -c +$((off + 1)) "$out/vmlinuz" | xz -dc >"$out/vmlinux.tmp" 2>/dev/null || true
	head -c 4 "$out/vmlinux.tmp" | grep -q ELF || { echo "mkassets: vmlinux extraction failed" >&2; exit 1; }
	mv "$out/vmlinux.tmp" "$out/vmlinux"
fi
echo "$out/root/lib/modules/$KREL" >"$out/moddir"

# 2. Initramfs, keyed by the hash of its inputs.
key=$( (cat "$here/init.sh" "$here/node-modules.txt" "$0"; sha256sum /bin/busybox) | sha256sum | cut -c1-16)
if [ ! -f "$out/initramfs.cpio.gz" ] || [ "$(cat "$out/initramfs.key" 2>/dev/null)" != "$key" ]; then
	ir=$(mktemp -d "$out/ir.XXXXXX")
	trap 'rm -rf "$ir"' EXIT
	mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,modules,ro,rw,newroot}
	cp /bin/busybox "$ir/bin/busybox"
	ln -s busybox "$ir/bin/sh"
	install -m 0755 "$here/init.sh" "$ir/init"
	: >"$ir/modules/order"
	grep -v '^#' "$here/node-modules.txt" | while read -r m; do
		[ -n "$m" ] || continue
		f=$(modinfo -b "$out/root" -k "$KREL" -F filename "$m")
		case $f in
		*.ko) cp "$f" "$ir/modules/$m.ko" ;;
		*.ko.xz) xz -dc "$f" >"$ir/modules/$m.ko" ;;
		*) echo "mkassets: module $m: unexpected file '$f'" >&2; exit 1 ;;
		esac
		echo "$m" >>"$ir/modules/order"
	done
	(cd "$ir" && find . -mindepth 1 -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -1 >"$out/initramfs.cpio.gz.tmp"
	mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
	echo "$key" >"$out/initramfs.key"
	rm -rf "$ir"
	trap - EXIT
fi
ln -sfn "$VER" "$cache/node/current"
echo "mkassets: node assets ready in $out"
