#!/bin/sh
# Install what the aarch64 emulation harness needs on the host: a static qemu-aarch64 and debootstrap.
# Called by `make emulation-tools` (and so by `make test` / .ci/run). Idempotent; exits non-zero with a clear
# message when the tools are missing and cannot be installed: the emulated-device tests must fail, never skip.
#
# Debian bookworm ships QEMU 7.2; bookworm-backports has 10.x, which this script prefers (QEMU 7.2 needs the
# fake /proc/cpuinfo files the harness writes anyway, and gives wrong int8 results with `-cpu max`, which the
# harness never uses).
set -eu

have_tools() {
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || return 1
    command -v dpkg-deb >/dev/null 2>&1 || return 1
    command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1 || return 1
}

if have_tools; then
    exit 0
fi

fail() {
    echo "fundus-edge: the aarch64 emulation harness needs qemu-user (static qemu-aarch64) and debootstrap." >&2
    echo "  $1" >&2
    echo "  On Debian/Ubuntu, as root: apt-get update && apt-get install -y qemu-user-static debootstrap" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get is not available on this machine; install them with your package manager."
[ "$(id -u)" = 0 ] || fail "not root, so they cannot be installed here."

export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
backports=""
if [ "$codename" = bookworm ]; then
    list=/etc/apt/sources.list.d/fundus-edge-bookworm-backports.list
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" > "$list"
    fi
    backports=bookworm-backports
fi
echo "fundus-edge: installing qemu-user and debootstrap (apt-get)" >&2
# A third-party source that cannot be reached makes `apt-get update` fail as a whole; the install below says
# whether the Debian archive itself was usable.
apt-get update -qq || echo "fundus-edge: apt-get update reported errors; trying to install anyway" >&2
if [ -n "$backports" ] && apt-get install -y -qq --no-install-recommends -t "$backports" qemu-user >/dev/null; then
    :
elif apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null; then
    :
else
    fail "apt-get could not install qemu-user / qemu-user-static (no network to the Debian mirror?)."
fi
apt-get install -y -qq --no-install-recommends debootstrap >/dev/null || fail "apt-get could not install debootstrap."
have_tools || fail "installed packages, but qemu-aarch64 / debootstrap are still not on PATH."
echo "fundus-edge: $( (qemu-aarch64-static --version 2>/dev/null || qemu-aarch64 --version) | head -1)" >&2
