# The start every test guest's /init shares; tests/common/guest.rs packs it into each initramfs
# as /rrrow-boot.sh, and the /init scripts source it first (`. /rrrow-boot.sh`).
#
# Installs the busybox applets, mounts proc, sys and dev, loads the virtio modules, waits for
# /dev/vda, and reads the phase from the kernel command line (rrrow.phase=...) into $phase.
# Results go to the serial console as `RRROW: <key> <value>` lines (say); a failure prints
# `RRROW: FAIL <what>` and powers off (fail).
/bin/busybox --install -s
export PATH=/sbin:/bin

say() { echo "RRROW: $*"; }
fail() {
    say "FAIL $*"
    sync
    poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "no /dev/vda after 10 s"
    usleep 100000
done

phase=$(sed -n 's/.*rrrow\.phase=\([a-z]*\).*/\1/p' /proc/cmdline)
say "phase $phase"
say "queues $(ls /sys/block/vda/mq | wc -l)"
