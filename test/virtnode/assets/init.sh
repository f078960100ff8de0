#!/bin/sh
# Virt-node init: PID 1 inside the node's initramfs (busybox-static).
# 1. inserts the modules listed in /modules/order,
# 2. mounts the host's / (9p tag "hostroot", read-only) with a tmpfs overlay
#    on top as the new root, plus read-write 9p shares at their host paths,
# 3. mounts proc/sys/dev/run, sets up eth0 and the hostname,
# 4. chroots and execs the command agent (vn.agent) as PID 1.
# Parameters come from the kernel command line (vn.KEY=VALUE, no spaces):
#   vn.name   hostname             vn.ip     eth0 address, CIDR (optional)
#   vn.agent  agent binary path    vn.ctl    control directory (a share)
#   vn.moddir host path of this kernel's lib/modules/<release>
#   vn.shares tag=path,tag=path    read-write 9p shares to mount at path
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() {
	read -r up _ </proc/uptime
	echo "vn-init[$up]: $*"
}

fatal() {
	echo "vn-init: FATAL: $*"
	sync
	poweroff -f
}

say "inserting modules"
for m in $(cat /modules/order); do
	insmod "/modules/$m.ko" || echo "vn-init: insmod $m failed"
done

for p in $(cat /proc/cmdline); do
	case $p in
	vn.*=*)
		k=${p%%=*}
		k=${k#vn.}
		v=${p#*=}
		eval "vn_$k=\$v"
		;;
	esac
done
[ -n "$vn_agent" ] || fatal "no vn.agent on the kernel command line"

say "mounting the host root"
p9opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$p9opts,ro" hostroot /ro || fatal "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fatal "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot ||
	fatal "overlay mount failed"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null || true
if [ -n "$vn_moddir" ]; then
	mkdir -p "$R/lib/modules/$(uname -r)"
	mount --bind "/ro$vn_moddir" "$R/lib/modules/$(uname -r)" || echo "vn-init: no modules dir $vn_moddir"
fi
for s in $(echo "$vn_shares" | tr , ' '); do
	tag=${s%%=*}
	path=${s#*=}
	mkdir -p "$R$path"
	mount -t 9p -o "$p9opts" "$tag" "$R$path" || fatal "cannot mount share $tag at $path"
done

say "network"
ip link set lo up
if [ -n "$vn_ip" ]; then
	ip link set eth0 up && ip addr add "$vn_ip" dev eth0 || echo "vn-init: eth0 setup failed"
fi
if [ -n "$vn_name" ]; then
	hostname "$vn_name"
	echo "$vn_name" >$R/etc/hostname
fi
[ -n "$vn_ctl" ] && [ -f "$R$vn_ctl/hosts" ] && cat "$R$vn_ctl/hosts" >$R/etc/hosts

say "starting the agent"
exec chroot $R "$vn_agent" -ctl "$vn_ctl"
fatal "exec of the agent failed"
