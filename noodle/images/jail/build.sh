#!/bin/sh
# Build what the `jail` kind needs; safe to run again and again.
#
#   1. the Debian packages it drives (bubblewrap; util-linux for setpriv),
#      installed only when missing, so a warm machine does not touch apt;
#   2. the read-only lower directory of every slot's overlay root, in
#      DEST/rootfs: only mount points and a tiny /etc, because the host's
#      /usr and Python are bind-mounted read-only at spawn time.
#
# Usage: noodle image build jail, or build.sh [DEST]
#        (DEST defaults to $NOODLE_IMAGE_OUT, else /var/lib/noodle/images/jail)
set -eu

dest=${1:-${NOODLE_IMAGE_OUT:-/var/lib/noodle/images/jail}}

missing=""
command -v bwrap >/dev/null 2>&1 || missing="$missing bubblewrap"
command -v setpriv >/dev/null 2>&1 || missing="$missing util-linux"
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build.sh: missing packages:$missing (run as root to install them)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    apt-get install -y -qq --no-install-recommends $missing
fi

# Bump when the layout below changes, so old trees are rebuilt.
version=3
mkdir -p "$dest"
if [ -z "${FORCE:-}" ] && [ -f "$dest/rootfs/.noodle-rootfs" ] && [ "$(cat "$dest/rootfs/.noodle-rootfs")" = "$version" ]; then
    echo "build.sh: $dest/rootfs is up to date"
    exit 0
fi

# Built beside the final place and renamed in, so a concurrent reader (a
# running test) never sees a half-made tree.
tmp=$(mktemp -d "$dest/.rootfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
r="$tmp"
chmod 0755 "$r"
for d in usr etc tmp var/tmp proc dev sys run/noodle opt/python opt/noodle home/sandbox root; do
    mkdir -p "$r/$d"
done
chmod 1777 "$r/tmp" "$r/var/tmp"
chmod 0700 "$r/root"
chmod 0777 "$r/home/sandbox"
# Mirror the host's merged-/usr symlinks; real directories become mount points.
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$r/$d"
    elif [ -d "/$d" ]; then
        mkdir -p "$r/$d"
    fi
done
cat >"$r/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PW
cat >"$r/etc/group" <<'GR'
root:x:0:
sandbox:x:1000:
nogroup:x:65534:
GR
printf '127.0.0.1 localhost\n::1 localhost\n' >"$r/etc/hosts"
printf 'passwd: files\ngroup: files\nhosts: files\n' >"$r/etc/nsswitch.conf"
: >"$r/etc/resolv.conf"
echo "$version" >"$r/.noodle-rootfs"

rm -rf "$dest/rootfs.old"
[ -d "$dest/rootfs" ] && mv "$dest/rootfs" "$dest/rootfs.old"
mv "$r" "$dest/rootfs"
trap - EXIT
rm -rf "$dest/rootfs.old"
echo "build.sh: built $dest/rootfs"
