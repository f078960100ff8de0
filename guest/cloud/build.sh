#!/bin/bash
# Debian's cloud kernel for hpcvm guests, plus a matching initramfs.
#
#   guest/cloud/build.sh -> $HPCVM_CACHE/guest/cloud/{vmlinuz,vmlinux,config,initramfs.cpio.gz}
#
# One exact package is pinned (name and version below). Its virtio drivers are
# modules: they are resolved with depmod's modules.dep and listed in load
# order in /etc/hpcvm/modules for the shared /init (guest/initramfs/init).
set -euo pipefail

PKG=${CLOUD_KERNEL_PKG:-linux-image-6.1.0-49-cloud-amd64}
VER=${CLOUD_KERNEL_VER:-6.1.174-1}
KVER=${PKG#linux-image-}
# Top-level modules wanted; their dependencies are added from modules.dep.
MODULES="virtio_mmio virtio_blk vmw_vsock_virtio_transport"

here=$(cd "$(dirname "$0")" && pwd)
cache=${HPCVM_CACHE:-$HOME/.cache/hpcvm}
out=$cache/guest/cloud
dl=$out/dl
die() { echo "guest-cloud-kernel: $*" >&2; exit 1; }

mkdir -p "$dl"
exec 9>"$out/.lock"
flock 9

deb=$dl/${PKG}_${VER}_amd64.deb
if [ ! -f "$deb" ]; then
	echo "guest-cloud-kernel: downloading $PKG=$VER"
	# apt's _apt user must be able to write the target directory.
	tmp=$(mktemp -d) && chmod 755 "$tmp" && chown _apt "$tmp" 2>/dev/null || true
	if ! (cd "$tmp" && apt-get download -q "$PKG=$VER"); then
		echo "guest-cloud-kernel: $PKG=$VER not available; apt-cache policy $PKG:" >&2
		apt-cache policy "$PKG" >&2 || true
		die "run apt-get update, or set CLOUD_KERNEL_VER to an available version"
	fi
	mv "$tmp"/*.deb "$deb" && rm -rf "$tmp"
fi

key=$( { echo "$PKG $VER $MODULES"; sha256sum "$deb" "$0" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
pkgdir=$out/pkg-$VER
if [ "$(cat "$out/cloud.key" 2>/dev/null)" != "$key" ] || [ ! -f "$out/vmlinuz" ]; then
	rm -rf "$pkgdir" && dpkg -x "$deb" "$pkgdir"
	moddir=$pkgdir/lib/modules/$KVER
	[ -d "$moddir" ] || die "no $moddir in $deb"
	# The package ships no modules.dep (its postinst runs depmod).
	/sbin/depmod -b "$pkgdir" "$KVER"

	# Depth-first over modules.dep: every module after its dependencies.
	declare -A dep=() seen=()
	while IFS=: read -r m d; do dep[$m]=$d; done < "$moddir/modules.dep"
	order=()
	visit() {
		local m=$1 d
		[ -z "${seen[$m]:-}" ] || return 0
		seen[$m]=1
		for d in ${dep[$m]}; do visit "$d"; done
		order+=("$m")
	}
	for name in $MODULES; do
		path=$(grep -E "(^|/)$name\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | cut -d: -f1)
		[ -n "$path" ] || die "module $name not in $moddir/modules.dep"
		visit "$path"
	done

	extra=$out/extra-root
	rm -rf "$extra" && mkdir -p "$extra/etc/hpcvm" "$extra/lib/modules/$KVER"
	: > "$extra/etc/hpcvm/modules"
	for m in "${order[@]}"; do
		mkdir -p "$extra/lib/modules/$KVER/$(dirname "$m")"
		cp "$moddir/$m" "$extra/lib/modules/$KVER/$m"
		echo "/lib/modules/$KVER/$m" >> "$extra/etc/hpcvm/modules"
	done
	cp "$moddir"/modules.{order,builtin,dep} "$extra/lib/modules/$KVER/"

	cp "$pkgdir/boot/vmlinuz-$KVER" "$out/vmlinuz"
	cp "$pkgdir/boot/config-$KVER" "$out/config"
	# The ELF inside the bzImage (LZ4 in Debian's config) carries the PVH note.
	rm -f "$out/vmlinux"
	if command -v lz4 >/dev/null; then
		off=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$out/vmlinuz" | head -1 | cut -d: -f1)
		tail -c +$((off + 1)) "$out/vmlinuz" | lz4 -dc > "$out/vmlinux.tmp" 2>/dev/null || true
		if readelf -n "$out/vmlinux.tmp" 2>/dev/null | grep -q '0x00000012'; then
			mv "$out/vmlinux.tmp" "$out/vmlinux"
		else
			echo "guest-cloud-kernel: warning: could not extract a PVH vmlinux" >&2
		fi
		rm -f "$out/vmlinux.tmp"
	else
		echo "guest-cloud-kernel: lz4 missing (apt-get install lz4): no $out/vmlinux" >&2
	fi
	rm -rf "$pkgdir"
	echo "$key" > "$out/cloud.key"
	echo "guest-cloud-kernel: $PKG $VER, modules: $(xargs -n1 basename < "$extra/etc/hpcvm/modules" | tr '\n' ' ')"
fi

"$here/../initramfs/build.sh" "$out/initramfs.cpio.gz" "$out/extra-root"
echo "guest-cloud-kernel: $out/vmlinuz $out/initramfs.cpio.gz"
