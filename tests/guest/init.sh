#!/bin/busybox sh
# /init of the RR-Row end-to-end test guest (packed into an initramfs by tests/common/guest.rs).
#
# Kernel command line: rrrow.phase=write|verify. Results go to the serial console as
# `RRROW: <key> <value>` lines, parsed by tests/guest_e2e.rs; any failure prints
# `RRROW: FAIL <what>` and powers off.
#
# Disk layout (/dev/vda, at least 112 MiB): an ext4 filesystem on the first 96 MiB, a raw
# pattern (/pattern.bin from the initramfs, 8 MiB) written with dd at 100 MiB, in two halves by
# two concurrent writers.
. /rrrow-boot.sh
say "disk-bytes $(blockdev --getsize64 /dev/vda)"
say "serial $(cat /sys/block/vda/serial 2>/dev/null)"
say "write-cache $(cat /sys/block/vda/queue/write_cache | tr ' ' '-')"

PATTERN_SEEK_MIB=100
PATTERN_MIB=8
read_pattern() {
    # O_DIRECT: the data comes from the device, not from the page cache.
    dd if=/dev/vda bs=1M skip=$PATTERN_SEEK_MIB count=$PATTERN_MIB iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}

case "$phase" in
write)
    # Two writers at once, pinned to the two vCPUs so both virtqueues carry requests: the
    # first half in 1 MiB requests from CPU 0, the second half in 64 KiB requests from CPU 1.
    taskset 1 dd if=/pattern.bin of=/dev/vda bs=1M count=4 seek=$PATTERN_SEEK_MIB \
        oflag=direct conv=fsync 2>/dev/null &
    w1=$!
    taskset 2 dd if=/pattern.bin of=/dev/vda bs=64k skip=64 count=64 \
        seek=$(((PATTERN_SEEK_MIB + 4) * 16)) oflag=direct conv=fsync 2>/dev/null &
    w2=$!
    wait $w1 || fail "pattern write (first half)"
    wait $w2 || fail "pattern write (second half)"
    say "pattern-read $(read_pattern)"

    /sbin/mke2fs -V 2>&1 | head -n1 | sed 's/^/RRROW: mke2fs /'
    /sbin/mke2fs -q -F -t ext4 /dev/vda 96M || fail "mke2fs"
    mount -t ext4 /dev/vda /mnt || fail "mount ext4"
    mkdir -p /mnt/dir/sub
    cp /pattern.bin /mnt/pattern.bin || fail "cp pattern"
    dd if=/dev/urandom of=/mnt/dir/small bs=517 count=3 2>/dev/null || fail "small file"
    dd if=/dev/urandom of=/mnt/dir/sub/medium bs=64k count=37 2>/dev/null || fail "medium file"
    dd if=/dev/urandom of=/mnt/big bs=1M count=12 2>/dev/null || fail "big file"
    # Rewrite part of the big file in place: redirect-on-write must keep the newest data.
    dd if=/dev/urandom of=/mnt/big bs=4k seek=100 count=50 conv=notrunc 2>/dev/null \
        || fail "rewrite"
    dd if=/dev/zero of=/mnt/scratch bs=1M count=4 2>/dev/null || fail "scratch file"
    sync
    rm /mnt/scratch
    (cd /mnt && find . -type f ! -name SUMS | sort | xargs sha256sum >SUMS) || fail "sums"
    sed 's/^/RRROW: sum /' /mnt/SUMS
    # Discards reach the device through the filesystem (when the device offers DISCARD).
    if fstrim /mnt 2>/dev/null; then say "fstrim ok"; else say "fstrim unsupported"; fi
    sync
    umount /mnt || fail "umount"
    ;;
verify)
    say "pattern-read $(read_pattern)"
    /sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1
    rc=$?
    say "fsck-rc $rc"
    [ "$rc" -eq 0 ] || sed 's/^/RRROW: fsck-log /' /tmp/fsck.log
    mount -t ext4 -o ro /dev/vda /mnt || fail "mount ext4"
    (cd /mnt && find . -type f ! -name SUMS | sort | xargs sha256sum) | sed 's/^/RRROW: sum /'
    if (cd /mnt && sha256sum -c -s SUMS); then say "sums-check ok"; else say "sums-check bad"; fi
    umount /mnt
    ;;
*)
    fail "unknown phase '$phase'"
    ;;
esac
sync
# Field 15 of the block stat file: flush requests completed (sent only to a write-back cache).
say "flushes $(awk '{print $15}' /sys/block/vda/stat)"
say "done $phase"
poweroff -f
