#!/bin/bash
# Builds the virt-node assets into $HPCVM_CACHE/node/<version>/:
#   vmlinuz             Debian's kernel for the nodes (bzImage)
#   vmlinux             the same kernel decompressed (ELF with PVH note; booted)
#   initramfs.cpio.gz   busybox-static + the modules in node-modules.txt + init.sh
#   root/               the unpacked kernel package (its lib/modules is bind-mounted
#                       into each node, so modprobe works there for anything else)
#   qemu, qemu-data     paths of the QEMU that runs the nodes and of its data dir:
#                       Debian's bookworm-backports QEMU, unpacked under
#                       $HPCVM_CACHE/qemu/<version> (the host's packages are not touched)
# and points $HPCVM_CACHE/node/current at that directory.
# Idempotent: the kernel package is downloaded and unpacked once per version,
# the initramfs is rebuilt only when its inputs (this directory, busybox) change.
set -euo pipefail

# The node kernel: one exact version. NODE_KERNEL=6.1 selects bookworm's
# 6.1 (the nodes' kernel until 2026-11-23), the default is bookworm-backports'
# 6.12 (docs/testing.md: why).
case ${NODE_KERNEL:-6.12} in
6.1)
	KSUITE=bookworm
	PKG=linux-image-6.1.0-49-amd64
	VER=6.1.174-1
	KREL=6.1.0-49-amd64 ;;
6.12)
	KSUITE=bookworm-backports
	PKG=linux-image-6.12.95+deb12-amd64
	VER=6.12.95-1~bpo12+1
	KREL=6.12.95+deb12-amd64 ;;
*) echo "mkassets: NODE_KERNEL=$NODE_KERNEL: want 6.1 or 6.12" >&2; exit 1 ;;
esac
# QEMU 7.2 (bookworm) hangs nodes: a nested guest spinning without exits
# starved the node of its own interrupts until it stopped dead
# (docs/testing.md). bookworm-backports carries 10.0.
QEMU_SUITE=bookworm-backports
QEMU_VER=1:10.0.2+ds-2+deb13u1~bpo12+1
QEMU_PKGS="qemu-system-x86 qemu-system-data qemu-system-common"

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

# private_apt DIR SUITE: an apt list of Debian's SUITE in DIR, used through
# "${apt[@]}", so the host's sources and state stay as they are.
private_apt() {
	mkdir -p "$1/lists/partial"
	echo "deb http://deb.debian.org/debian $2 main" >"$1/sources.list"
	apt=(-o Dir::Etc::sourcelist="$1/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$1/lists")
	apt-get -q "${apt[@]}" update >/dev/null
}

# 1. Kernel package: one exact version, never a glob.
if [ ! -f "$out/root/.stamp" ]; then
	tmp=$(mktemp -d "$out/dl.XXXXXX") && chmod 755 "$tmp"
	trap 'rm -rf "$tmp"' EXIT
	private_apt "$tmp" "$KSUITE"
	(cd "$tmp" && apt-get -q "${apt[@]}" download "$PKG=$VER")
	rm -rf "$out/root"
	mkdir -p "$tmp/root"
	dpkg-deb -x "$tmp"/"${PKG}"_*_amd64.deb "$tmp/root"
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
	# The payload is XZ (6.1) or zstd (6.12); the decompressors complain
	# about the data after it, but the ELF is complete.
	off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$out/vmlinuz" | head -1 | cut -d: -f1 || true)
	if [ -n "$off" ]; then
		tail -c +$((off + 1)) "$out/vmlinuz" | xz -dc >"$out/vmlinux.tmp" 2>/dev/null || true
	else
		need zstd zstd
		off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$out/vmlinuz" | head -1 | cut -d: -f1)
		[ -n "$off" ] || { echo "mkassets: no XZ or zstd payload in vmlinuz" >&2; exit 1; }
		tail -c +$((off + 1)) "$out/vmlinuz" | zstd -dc >"$out/vmlinux.tmp" 2>/dev/null || true
	fi
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
	# Each listed module with its dependencies first (modules.dep of this
	# kernel: module splits differ between releases), each once.
	grep -v '^#' "$here/node-modules.txt" | while read -r want; do
		[ -n "$want" ] || continue
		show=$(modprobe -d "$out/root" -S "$KREL" --show-depends "$want") ||
			{ echo "mkassets: module $want: not in $KREL" >&2; exit 1; }
		deps=$(echo "$show" | awk '$1 == "insmod" {print $2}')
		[ -n "$deps" ] || continue # built into this kernel
		for f in $deps; do
			m=$(basename "$f"); m=${m%.xz}; m=${m%.ko}
			grep -qx "$m" "$ir/modules/order" && continue
			case $f in
			*.ko) cp "$f" "$ir/modules/$m.ko" ;;
			*.ko.xz) xz -dc "$f" >"$ir/modules/$m.ko" ;;
			*) echo "mkassets: module $m: unexpected file '$f'" >&2; exit 1 ;;
			esac
			echo "$m" >>"$ir/modules/order"
		done
	done
	(cd "$ir" && find . -mindepth 1 -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -1 >"$out/initramfs.cpio.gz.tmp"
	mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
	echo "$key" >"$out/initramfs.key"
	rm -rf "$ir"
	trap - EXIT
fi
# 3. The node QEMU: one exact version from a private apt list, so the host's
# sources and installed packages stay as they are.
qdir=$cache/qemu/$(echo "$QEMU_VER" | tr ':~+' '___')
if [ ! -x "$qdir/root/usr/bin/qemu-system-x86_64" ]; then
	tmp=$(mktemp -d "$cache/qemu-dl.XXXXXX") && chmod 755 "$tmp"
	trap 'rm -rf "$tmp"' EXIT
	private_apt "$tmp" "$QEMU_SUITE"
	(cd "$tmp" && for p in $QEMU_PKGS; do apt-get -q "${apt[@]}" download "$p=$QEMU_VER"; done)
	# Its libraries come from bookworm: install what the host lacks (QEMU
	# 10 needs a few that 7.2 does not, e.g. libasound2, libcacard0).
	deps=$(for d in "$tmp"/*.deb; do dpkg-deb -f "$d" Depends; done | tr ',' '\n' |
		sed 's/(.*)//; s/|.*//; s/[[:space:]]//g' | grep -v '^qemu-system' | sort -u)
	missing=""
	for p in $deps; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
	done
	if [ -n "$missing" ]; then
		echo "mkassets: installing the node QEMU's libraries:$missing"
		apt-get install -y --no-install-recommends $missing ||
			{ apt-get update && apt-get install -y --no-install-recommends $missing; }
	fi
	mkdir -p "$tmp/root"
	for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$tmp/root"; done
	missing=$(ldd "$tmp/root/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
	[ -z "$missing" ] || { printf "mkassets: the node QEMU lacks libraries:\n%s\n" "$missing" >&2; exit 1; }
	rm -rf "$qdir" && mkdir -p "$qdir"
	mv "$tmp/root" "$qdir/root"
	rm -rf "$tmp"
	trap - EXIT
fi
echo "$qdir/root/usr/bin/qemu-system-x86_64" >"$out/qemu"
echo "$qdir/root/usr/share/qemu" >"$out/qemu-data"
ln -sfn "$VER" "$cache/node/current"
echo "mkassets: node assets ready in $out"
