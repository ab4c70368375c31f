#!/usr/bin/env bash
# Build the microvm kind's guest: an uncompressed Debian kernel (vmlinux,
# booted through its PVH entry) and a busybox initramfs with the static C
# agent. Idempotent: every step is skipped when its output is newer than
# its inputs. Artifacts go to DEST ($NOODLE_IMAGE_OUT, else
# /var/lib/noodle/images/microvm).
#
#   noodle image build microvm           # build what is missing (or: build.sh [DEST])
#   noodle image build --force microvm   # rebuild everything (FORCE=1)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-${NOODLE_IMAGE_OUT:-${NOODLE_MICROVM_BUILD:-/var/lib/noodle/images/microvm}}}"
KERNEL_META="${KERNEL_META:-linux-image-cloud-amd64}"
mkdir -p "$OUT"

log() { printf 'build.sh: %s\n' "$*" >&2; }

# -- host packages: install only the missing ones ----------------------------
need=()
want() {  # package name; no pipe: with pipefail, grep -q could SIGPIPE its writer
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ] || need+=("$1")
}
want qemu-system-x86    # qemu-system-x86_64
want busybox-static     # the guest's userland (must be static: no libc in the initramfs)
want gcc
want libc6-dev          # static libc for the agent
want linux-libc-dev     # linux/random.h
want cpio
want gzip
want xz-utils
want zstd
want lz4                # Debian's cloud kernel is LZ4-compressed
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# -- kernel: fetch the Debian cloud kernel package, never install it ---------
if [ -n "${FORCE:-}" ] || [ ! -s "$OUT/vmlinux" ]; then
    pkg="$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
    if [ -z "$pkg" ]; then
        apt-get update -q
        pkg="$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/ {print $2; exit}')"
    fi
    [ -n "$pkg" ] || { log "cannot resolve $KERNEL_META"; exit 1; }
    log "kernel package $pkg"
    rm -rf "$OUT/deb" "$OUT/kernel-root"
    mkdir -p "$OUT/deb" "$OUT/kernel-root"
    (cd "$OUT/deb" && apt-get download -q "$pkg")
    dpkg -x "$OUT"/deb/*.deb "$OUT/kernel-root"
    vmlinuz="$(ls "$OUT"/kernel-root/boot/vmlinuz-* | head -n1)"
    python3 "$HERE/extract_vmlinux.py" "$vmlinuz" "$OUT/vmlinux.tmp"
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
    cp "$OUT"/kernel-root/boot/config-* "$OUT/kernel.config"
    basename "$vmlinuz" | sed 's/^vmlinuz-//' > "$OUT/kernel.release"
    rm -rf "$OUT/deb"
fi
release="$(cat "$OUT/kernel.release")"

# -- the in-guest agent: static C, same frames as noodle/agent.py ------------
if [ -n "${FORCE:-}" ] || [ ! -x "$OUT/noodle-agent" ] || [ "$HERE/agent.c" -nt "$OUT/noodle-agent" ]; then
    log "compiling agent"
    gcc -static -Os -Wall -Wextra -Werror -o "$OUT/noodle-agent.tmp" "$HERE/agent.c"
    strip "$OUT/noodle-agent.tmp"
    mv "$OUT/noodle-agent.tmp" "$OUT/noodle-agent"
fi

# -- initramfs ---------------------------------------------------------------
stamp_inputs=("$HERE/init" "$HERE/modules.txt" "$OUT/noodle-agent" "$OUT/vmlinux" /bin/busybox)
rebuild=""
[ -n "${FORCE:-}" ] || [ ! -s "$OUT/initramfs.cpio.gz" ] && rebuild=1
for f in "${stamp_inputs[@]}"; do
    [ "$f" -nt "$OUT/initramfs.cpio.gz" ] && rebuild=1
done
if [ -n "$rebuild" ]; then
    log "building initramfs"
    root="$OUT/initramfs-root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,etc,root,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    install -m 0755 "$HERE/init" "$root/init"
    install -m 0755 "$OUT/noodle-agent" "$root/sbin/noodle-agent"
    # Modules the guest needs that this kernel builds as modules (see
    # modules.txt); built-in ones are simply not found and skipped.
    moddir="$OUT/kernel-root/lib/modules/$release"
    : > "$root/lib/modules/load-order"
    while read -r mod; do
        case "$mod" in ''|'#'*) continue ;; esac
        ko="$(find "$moddir" -name "$mod.ko*" | head -n1 || true)"
        [ -n "$ko" ] || continue
        case "$ko" in
            *.xz) xz -dc "$ko" > "$root/lib/modules/$mod.ko" ;;
            *.zst) zstd -qdc "$ko" > "$root/lib/modules/$mod.ko" ;;
            *) cp "$ko" "$root/lib/modules/$mod.ko" ;;
        esac
        echo "$mod" >> "$root/lib/modules/load-order"
    done < "$HERE/modules.txt"
    echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
    echo "root:x:0:" > "$root/etc/group"
    echo "noodle" > "$root/etc/hostname"
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet) \
        | gzip -1 > "$OUT/initramfs.cpio.gz.tmp"
    mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
fi

log "ok: $OUT/vmlinux $OUT/initramfs.cpio.gz (kernel $release)"
