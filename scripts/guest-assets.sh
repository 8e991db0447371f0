#!/usr/bin/env bash
# Installs and prepares everything the RR-Row tests need beyond the Rust toolchain, on Debian 12
# as root. Idempotent: a second run only checks, in well under a second.
#
# System packages (apt-get install): qemu-utils (qemu-img, qemu-storage-daemon) when missing,
# e2fsprogs, xz-utils, and the shared libraries the private QEMU binary links against.
#
# Private, under $RR_ROW_TEST_ASSETS (default: <repo>/.test-assets), extracted with
# `apt-get download` + `dpkg -x` so nothing on the system changes:
#   qemu/      qemu-system-x86 7.2 with its data, module and firmware packages. Never
#              `apt-get install qemu-system-x86`: it pulls qemu-system-common 7.2, which Breaks
#              the backported qemu-utils 10 and removes qemu-img and qemu-storage-daemon.
#   kernel/    linux-image-amd64's kernel package, plus vmlinux: the uncompressed ELF extracted
#              from the bzImage, booted through its PVH entry (about 3 s to /init under TCG).
#   guest/     the files of the test guest's initramfs (the test packs them into a cpio):
#              bin/busybox (busybox-static), sbin/mke2fs and sbin/e2fsck with their shared
#              library closure, etc/mke2fs.conf, lib/modules/*.ko and lib/modules/load-order
#              (virtio-blk and ext4 are modules in Debian's kernel, loaded in that order).
#   READY      written last; the tests refuse to run without it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="${RR_ROW_TEST_ASSETS:-$ROOT/.test-assets}"
# Bump when the layout below changes, so stale caches are rebuilt.
LAYOUT=3

log() { printf 'guest-assets: %s\n' "$*" >&2; }
die() { printf 'guest-assets: error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, else through sudo (only asked for when
# something must actually be installed).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "must run as root (or with sudo) to run: $*"
    fi
}
export DEBIAN_FRONTEND=noninteractive

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}

# Installs the named packages that are not installed yet.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    if ! as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt_update_once
        as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# apt-get download into $ASSETS/debs (skipping what is already there), echoing the .deb paths.
apt_download() {
    local dir="$ASSETS/debs" p
    mkdir -p "$dir"
    for p in "$@"; do
        if ! compgen -G "$dir/${p}_*.deb" >/dev/null; then
            log "apt-get download $p"
            # Downloading into a root-owned folder makes apt warn about its sandbox user: harmless.
            if ! (cd "$dir" && apt-get download -qq "$p" 2>/dev/null); then
                apt_update_once
                (cd "$dir" && apt-get download -qq "$p" 2>/dev/null) || die "cannot download $p"
            fi
        fi
        compgen -G "$dir/${p}_*.deb" | head -n1
    done
}

# Echoes the versioned package a metapackage depends on (linux-image-amd64 -> linux-image-6.1...).
first_dep() {
    dpkg-deb -f "$1" Depends | tr ',' '\n' | sed -e 's/^ *//' -e 's/[ (].*//' | head -n1
}

# --- system packages --------------------------------------------------------------------------
sys_packages=(e2fsprogs xz-utils)
command -v qemu-storage-daemon >/dev/null && command -v qemu-img >/dev/null \
    || sys_packages+=(qemu-utils)
apt_install "${sys_packages[@]}"

QEMU_BIN="$ASSETS/qemu/usr/bin/qemu-system-x86_64"
if [ -f "$ASSETS/READY" ] && [ "$(cat "$ASSETS/READY")" = "layout $LAYOUT" ]; then
    # Fast path: only make sure the system still has QEMU's shared libraries.
    # (grep without -q reads all of ldd's output, so pipefail cannot see a SIGPIPE.)
    if ! ldd "$QEMU_BIN" | grep 'not found' >/dev/null; then
        exit 0
    fi
    rm -f "$ASSETS/READY"
fi
rm -f "$ASSETS/READY"
mkdir -p "$ASSETS"

# --- QEMU, privately --------------------------------------------------------------------------
if [ ! -x "$QEMU_BIN" ]; then
    rm -rf "$ASSETS/qemu"
    for deb in $(apt_download qemu-system-x86 qemu-system-common qemu-system-data seabios); do
        dpkg -x "$deb" "$ASSETS/qemu"
    done
fi
# Its shared libraries: the lib* packages among qemu-system-x86's Depends.
qemu_libs=()
for p in $(dpkg-deb -f "$(apt_download qemu-system-x86)" Depends | tr ',' '\n' \
        | sed -e 's/^ *//' -e 's/[ (].*//' | grep '^lib'); do
    qemu_libs+=("$p")
done
apt_install "${qemu_libs[@]}"
if ldd "$QEMU_BIN" | grep 'not found'; then
    die "qemu-system-x86_64 still misses the shared libraries listed above"
fi

# --- kernel and uncompressed vmlinux ----------------------------------------------------------
meta_deb="$(apt_download linux-image-amd64)"
kpkg="$(first_dep "$meta_deb")"
[ -n "$kpkg" ] || die "cannot tell which kernel linux-image-amd64 depends on"
kver="${kpkg#linux-image-}"
if [ ! -f "$ASSETS/kernel/boot/vmlinuz-$kver" ]; then
    rm -rf "$ASSETS/kernel"
    dpkg -x "$(apt_download "$kpkg")" "$ASSETS/kernel"
fi
if [ ! -s "$ASSETS/kernel/vmlinux" ]; then
    # Debian builds the kernel with CONFIG_KERNEL_XZ: the payload is the xz stream in the bzImage.
    vmlinuz="$ASSETS/kernel/boot/vmlinuz-$kver"
    off="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1)"
    [ -n "$off" ] || die "no xz stream in $vmlinuz"
    # xz stops reading at the end of its stream, so tail may die of SIGPIPE: not an error.
    { tail -c "+$((off + 1))" "$vmlinuz" || true; } \
        | xz -dc --single-stream >"$ASSETS/kernel/vmlinux.tmp"
    [ "$(head -c4 "$ASSETS/kernel/vmlinux.tmp" | od -An -c | tr -d ' ')" = '177ELF' ] \
        || die "the payload of $vmlinuz is not an ELF image"
    mv "$ASSETS/kernel/vmlinux.tmp" "$ASSETS/kernel/vmlinux"
fi

# --- guest root -------------------------------------------------------------------------------
G="$ASSETS/guest"
rm -rf "$G"
mkdir -p "$G/bin" "$G/sbin" "$G/etc" "$G/lib/modules"
bbroot="$ASSETS/busybox"
rm -rf "$bbroot"
dpkg -x "$(apt_download busybox-static)" "$bbroot"
cp "$bbroot/bin/busybox" "$G/bin/busybox"

# Real ext4 tools from the host's e2fsprogs, with their shared library closure.
for tool in mke2fs e2fsck; do
    cp "/sbin/$tool" "$G/sbin/$tool"
    for lib in $(ldd "/sbin/$tool" | grep -o '/[^ ]*'); do
        mkdir -p "$G$(dirname "$lib")"
        cp -L "$lib" "$G$lib"
    done
done
cp /etc/mke2fs.conf "$G/etc/mke2fs.conf"

# Modules, dependencies first (read from each module's .modinfo; the package has no modules.dep).
mdir="$ASSETS/kernel/lib/modules/$kver"
declare -A seen=()
order=()
add_module() {
    local name="$1" file dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    file="$(find "$mdir" -name "$name.ko" -print -quit)"
    [ -n "$file" ] || die "module $name not found in $kpkg"
    for dep in $(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
    cp "$file" "$G/lib/modules/"
    order+=("$name")
}
# crc32c_generic provides the crc32c that ext4 and jbd2 ask for through the crypto API.
for m in crc32c_generic virtio_pci virtio_blk ext4; do add_module "$m"; done
printf '%s\n' "${order[@]}" >"$G/lib/modules/load-order"

printf '%s\n' "$kver" >"$ASSETS/kernel/version"
printf 'layout %s\n' "$LAYOUT" >"$ASSETS/READY"
log "ready in $ASSETS (kernel $kver, modules: ${order[*]})"
