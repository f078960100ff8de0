#!/bin/bash
# Build the minimal hpcvm guest kernel from Debian's linux-source-6.1.
#
#   guest/kernel/build.sh            -> $HPCVM_CACHE/guest/{bzImage,vmlinux,kernel.config}
#
# tinyconfig + guest/kernel/hpcvm.config (merge_config.sh) + olddefconfig, then
# every option of the fragment is checked to have survived. Outputs are keyed by
# a hash of the inputs (source package version, fragment, this script, compiler):
# when nothing changed this exits in well under a second.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${HPCVM_CACHE:-$HOME/.cache/hpcvm}
out=$cache/guest
src_tar=${LINUX_SOURCE_TAR:-/usr/src/linux-source-6.1.tar.xz}
fragment=$here/hpcvm.config
jobs=${JOBS:-$(nproc)}

die() { echo "guest-kernel: $*" >&2; exit 1; }
[ -r "$src_tar" ] || die "$src_tar missing: apt-get install linux-source-6.1"

src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c '%s-%Y' "$src_tar")
cc_ver=$(gcc --version | head -1)
key=$( { echo "$src_ver"; echo "$cc_ver"; cat "$fragment" "$0"; } | sha256sum | cut -c1-16)
dest=$out/kernel-$key

mkdir -p "$out"
exec 9>"$out/.kernel.lock"
flock 9

publish() {
	for f in bzImage vmlinux kernel.config; do
		cp "$dest/$f" "$out/.$f.tmp" && mv -f "$out/.$f.tmp" "$out/$f"
	done
	echo "$key" > "$out/kernel.key"
}

if [ -f "$dest/done" ]; then
	[ "$(cat "$out/kernel.key" 2>/dev/null)" = "$key" ] || publish
	echo "guest-kernel: up to date ($key): $out/bzImage $out/vmlinux"
	exit 0
fi

# One extracted source tree per source package version; one build dir reused
# across fragment changes so a changed fragment rebuilds incrementally.
srcdir=$out/linux-src-$src_ver
if [ ! -f "$srcdir/.extracted" ]; then
	echo "guest-kernel: extracting $src_tar"
	rm -rf "$srcdir" && mkdir -p "$srcdir"
	tar -xJf "$src_tar" -C "$srcdir" --strip-components=1
	touch "$srcdir/.extracted"
fi
build=$out/kbuild-$src_ver
mkdir -p "$build"

kmake() { make -C "$srcdir" O="$build" -s "$@"; }

kmake tinyconfig >/dev/null
"$srcdir/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$fragment" >"$build/merge.log"
kmake olddefconfig >/dev/null

# Check that every option of the fragment survived olddefconfig.
missing=()
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		grep -qxF -- "$line" "$build/.config" || missing+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$build/.config" || echo absent))")
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		! grep -q "^${BASH_REMATCH[1]}=" "$build/.config" || missing+=("$line (got: $(grep "^${BASH_REMATCH[1]}=" "$build/.config"))")
	fi
done < "$fragment"
if [ ${#missing[@]} -gt 0 ]; then
	echo "guest-kernel: options of $fragment dropped by olddefconfig (unmet dependencies?):" >&2
	printf '  %s\n' "${missing[@]}" >&2
	exit 1
fi
echo "guest-kernel: config ok ($(grep -c '=y' "$build/.config") options =y), building with -j$jobs"

start=$(date +%s)
kmake -j"$jobs" bzImage
echo "guest-kernel: built in $(( $(date +%s) - start ))s"

# The ELF must carry the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 0x12).
readelf -n "$build/vmlinux" | grep -A1 -E '^ +Xen' | grep -q '0x00000012' ||
	readelf -n "$build/vmlinux" | grep -qE 'Xen +0x[0-9a-f]+ +.*(0x00000012|PHYS32_ENTRY)' ||
	die "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"

rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
cp "$build/arch/x86/boot/bzImage" "$build/vmlinux" "$dest.tmp/"
cp "$build/.config" "$dest.tmp/kernel.config"
touch "$dest.tmp/done"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
publish
# Keep only the current keyed output.
for d in "$out"/kernel-*; do [ "$d" = "$dest" ] || rm -rf "$d"; done
echo "guest-kernel: $out/bzImage ($(stat -c %s "$out/bzImage") bytes), $out/vmlinux"
