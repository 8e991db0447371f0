#!/bin/busybox sh
# /init of the record/replay guest (tests/guest_record_replay.rs packs it into an initramfs).
#
# Kernel command line: rrrow.phase=workload|overwrite|mkfs|copy. Results go to the serial
# console as `RRROW: <key> <value>` lines; a failure prints `RRROW: FAIL <what>` and powers off.
#
# `workload` is what gets recorded and then replayed, so it must send the very same request
# stream every time it runs (the test's header explains why each choice below matters):
# one vCPU and one virtqueue, no I/O scheduler, every data request O_DIRECT from a single
# process (no page cache, no readahead, no writeback), no filesystem mounted on the disk, and
# deterministic data (the pattern file of the initramfs, never /dev/urandom).
. /rrrow-boot.sh
# Requests go to the device in the order the process issues them.
echo none >/sys/block/vda/queue/scheduler || fail "scheduler"

# sha256 of COUNT blocks of BS bytes at block SKIP, read with O_DIRECT (busybox dd allocates
# buffers of 4 KiB and more with mmap, so they are page aligned as O_DIRECT needs).
sum() {
    dd if=/dev/vda bs="$1" skip="$2" count="$3" iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}
# Writes COUNT blocks of BS bytes of /pattern.bin, from its block FROM, at block SEEK.
put() {
    dd if=/pattern.bin of=/dev/vda bs="$1" skip="$2" seek="$3" count="$4" oflag=direct \
        2>/dev/null || fail "write bs=$1 seek=$3"
}
# The regions the test compares (offsets in MiB: base 0-8, pattern 16-20, untouched 32-36).
report() {
    say "sum-base $(sum 64k 0 128)"
    say "sum-pattern $(sum 128k 128 32)"
    say "sum-zero $(sum 64k 512 64)"
    # Sub-block reads: 6 KiB requests starting 2 KiB into a 4 KiB block.
    say "sum-partial $(sum 6k 341 3)"
    say "sum-all $(sum 1M 0 40)"
}

case "$phase" in
workload)
    report
    # 4 MiB of pattern at 16 MiB in 128 KiB requests, then a flush (fsync).
    dd if=/pattern.bin of=/dev/vda bs=128k seek=128 count=32 oflag=direct conv=fsync \
        2>/dev/null || fail "pattern write"
    # Writes that start or end inside a 4 KiB block (6 KiB requests at 6 KiB multiples):
    # read-modify-write into new blocks on the device.
    put 6k 5 341 3     # 2 MiB - 2 KiB .. 2 MiB + 16 KiB
    put 6k 9 683 1     # 4 MiB + 2 KiB .. 4 MiB + 8 KiB
    put 6k 11 1366 1   # 8 MiB + 4 KiB .. 8 MiB + 10 KiB
    # Overwrite part of the pattern, then discard a MiB of it.
    put 64k 7 260 4    # 16.25 MiB .. 16.5 MiB
    blkdiscard -o $((18 << 20)) -l $((1 << 20)) /dev/vda || fail "blkdiscard"
    report
    ;;
overwrite)
    # A later session writes the same regions with other data.
    dd if=/dev/urandom of=/dev/vda bs=1M count=40 oflag=direct conv=fsync 2>/dev/null \
        || fail "overwrite"
    report
    ;;
mkfs)
    /sbin/mke2fs -q -F -t ext4 /dev/vda || fail "mke2fs"
    mount -t ext4 /dev/vda /mnt || fail "mount ext4"
    dd if=/dev/urandom of=/mnt/src bs=1M count=24 2>/dev/null || fail "src file"
    say "sum-src $(sha256sum /mnt/src | cut -d' ' -f1)"
    umount /mnt || fail "umount"
    ;;
copy)
    # Boot, mount, copy a file (cold cache: the copy reads it from the disk), unmount.
    mount -t ext4 /dev/vda /mnt || fail "mount ext4"
    cp /mnt/src /mnt/dst || fail "cp"
    sync
    say "sum-dst $(sha256sum /mnt/dst | cut -d' ' -f1)"
    umount /mnt || fail "umount"
    ;;
*)
    fail "unknown phase '$phase'"
    ;;
esac
say "done $phase"
poweroff -f
