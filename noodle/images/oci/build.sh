#!/bin/sh
# Build the root filesystem of the `oci` instance kind into DEST/rootfs.
#
# The rootfs is a skeleton directory tree plus a static busybox. Python is
# not copied in: the kind bind-mounts the host's /usr read-only over /usr
# (bin, sbin, lib and lib64 are symlinks into it, as on a merged-/usr Debian),
# and the agent file read-only over /noodle. So the image stays a few MB and
# always matches the host's Python, and nothing the container writes can
# reach the host: the rootfs itself is mounted read-only and /tmp is a tmpfs.
#
# Idempotent: packages are installed only when missing; a rootfs of the
# current layout is left alone (running containers use it), and otherwise
# rebuilt in a temporary directory and swapped in whole, so an interrupted
# run never leaves a half-built rootfs behind.
#
# Usage: noodle image build oci, or build.sh [--force] [DEST]   (as root; needs
# the Debian mirrors; DEST defaults to $NOODLE_IMAGE_OUT, else /var/lib/noodle/images/oci)
set -eu

# Bump when the tree below changes, so existing builds are redone.
LAYOUT=1
force=0
[ -n "${FORCE:-}" ] && force=1
out=${NOODLE_IMAGE_OUT:-/var/lib/noodle/images/oci}
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        *) out=$arg ;;
    esac
done
rootfs="$out/rootfs"

# Debian package -> a file it ships, to tell whether it is installed without
# asking dpkg per package.
need=""
for pair in runc:/usr/sbin/runc crun:/usr/bin/crun runsc:/usr/bin/runsc busybox-static:/bin/busybox; do
    pkg=${pair%%:*}
    file=${pair#*:}
    if ! dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || [ ! -x "$file" ]; then
        need="$need $pkg"
    fi
done
if [ -n "$need" ]; then
    echo "build.sh: installing$need" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2
fi

# The rootfs needs busybox-static's binary, which runs without the host's
# /usr (the dynamic `busybox` package ships the same path).
bb=/bin/busybox
if ! "$bb" true 2>/dev/null; then
    echo "build.sh: $bb missing or broken after installing busybox-static" >&2
    exit 1
fi
if ldd "$bb" >/dev/null 2>&1; then
    echo "build.sh: $bb is dynamically linked; install busybox-static" >&2
    exit 1
fi

marker="$rootfs/etc/noodle-image"
if [ "$force" = 0 ] && [ -f "$marker" ] && grep -q "^layout $LAYOUT\$" "$marker"; then
    echo "build.sh: rootfs at $rootfs is current (layout $LAYOUT); --force rebuilds it" >&2
    exit 0
fi

mkdir -p "$out"
tmp=$(mktemp -d "$out/.rootfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
# Mount points: /usr (host, read-only), /noodle (agent, read-only),
# /run/noodle (the slot's socket directory), /tmp (tmpfs), proc, sys, dev.
mkdir -p usr noodle run/noodle tmp proc sys dev etc root home opt/busybox/bin var/tmp
chmod 1777 tmp var/tmp
chmod 0700 root
ln -s usr/bin bin
ln -s usr/sbin sbin
ln -s usr/lib lib
ln -s usr/lib64 lib64

# A static busybox that works even without the host's /usr (debugging,
# `exec` of simple tools in a minimal image).
cp "$bb" opt/busybox/busybox
chmod 0755 opt/busybox/busybox
for applet in $(opt/busybox/busybox --list); do
    ln -s ../busybox "opt/busybox/bin/$applet"
done

cat > etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
cat > etc/group <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
echo noodle > etc/hostname
printf '127.0.0.1\tlocalhost noodle\n::1\tlocalhost ip6-localhost ip6-loopback\n' > etc/hosts
: > etc/resolv.conf
printf 'passwd: files\ngroup: files\nhosts: files\n' > etc/nsswitch.conf
printf 'pool-noodle oci rootfs, built %s by noodle image build oci\nlayout %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$LAYOUT" > etc/noodle-image

cd "$out"
if [ -d rootfs ]; then
    mv rootfs ".rootfs.old.$$"
fi
mv "$tmp" rootfs
chmod 0755 rootfs
rm -rf ".rootfs.old.$$"
trap - EXIT

echo "build.sh: rootfs ready at $rootfs" >&2
for tool in runc crun runsc; do
    printf '%s: ' "$tool" >&2
    "$tool" --version 2>&1 | head -n 1 >&2 || true
done
