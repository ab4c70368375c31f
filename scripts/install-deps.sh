#!/usr/bin/env bash
# Installs the Debian packages the sandbox kinds drive, only those missing.
# Idempotent; needs root (CI runs as root). Each images/<kind>/build.sh may
# install more of its own.
set -euo pipefail
pkgs=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || pkgs+=("$1"); }
# systemd: systemd-analyze, which the unit tests run (verify, security --offline)
# nats-server: the fleet tests start their own, on loopback
for p in bubblewrap runc crun qemu-system-x86 busybox-static iproute2 procps util-linux systemd nats-server; do need "$p"; done
# /dev/mqueue is where POSIX queues are visible for inspection and leak checks
if [ ! -d /dev/mqueue ] || ! mountpoint -q /dev/mqueue; then
  if [ "$(id -u)" = 0 ]; then mkdir -p /dev/mqueue && mount -t mqueue none /dev/mqueue || true; fi
fi
[ ${#pkgs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${pkgs[*]} (run as root: apt-get install ${pkgs[*]})" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
