#!/usr/bin/env bash
# Install what a fresh Debian 12 (bookworm) machine lacks for the statecapture
# test-suite.  Idempotent; run as root.  Prints what it installed.
#
#  * libvirt (embedded QEMU driver, in-process: no daemon) + QEMU (TCG) + qemu-img
#  * libvirt-dev + pkg-config + a C compiler: `pip install libvirt-python` builds from source
#  * e2fsprogs (mkfs.ext4 -d, debugfs), dpkg-dev tools, apt: guest kit build
#    (tests/_harness/guestkit.py downloads its Debian packages with apt-get download,
#    so the apt package lists must be present)
#  * python3-libnbd + libnbd-bin: NBD client for pull-mode backups (the
#    binding lands in /usr/lib/python3/dist-packages, i.e. Debian's python3.11;
#    a pyenv python does not see it without adding that directory to sys.path)
#  * openssh-server + netcat-openbsd: the fleet tests run a private sshd on a loopback port
#    and reach a private libvirtd through qemu+ssh:// (nc -U on the "remote" side)
#  * the libvirt-qemu user/group the Debian build of libvirt expects (created by
#    libvirt-daemon-system, which we do not install): without them opening
#    qemu:///embed as root fails with "Failed to parse user 'libvirt-qemu'"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root" >&2
    exit 1
fi

PKGS=(
    libvirt-daemon
    libvirt-daemon-driver-qemu
    libvirt-dev
    pkg-config
    gcc
    qemu-system-x86
    qemu-utils
    e2fsprogs
    cpio
    xz-utils
    zstd
    python3-libnbd
    libnbd-bin
    openssh-server
    netcat-openbsd
)

missing=()
for p in "${PKGS[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != "installed" ]; then
        missing+=("$p")
    fi
done

# The kit build needs package lists to `apt-get download` the guest kernel,
# busybox and qemu-guest-agent, so refresh them when they are absent too.
need_update=0
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    need_update=1
elif [ "${#missing[@]}" -gt 0 ]; then
    if ! apt-get install -y --no-install-recommends --dry-run "${missing[@]}" >/dev/null 2>&1; then
        need_update=1
    fi
fi
if ! apt-cache show linux-image-cloud-amd64 busybox-static qemu-guest-agent >/dev/null 2>&1; then
    need_update=1
fi
if [ "$need_update" -eq 1 ]; then
    echo "install-deps.sh: apt-get update"
    apt-get update -q
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps.sh: installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    echo "install-deps.sh: installed ${missing[*]}"
else
    echo "install-deps.sh: all packages already installed"
fi

# User and group the Debian libvirt build hard-codes as QEMU's default
# (qemu.conf in the embed root overrides them with root, but libvirt resolves
# the defaults first).  Same names libvirt-daemon-system's postinst creates.
getent group kvm >/dev/null || { groupadd --system kvm; echo "install-deps.sh: created group kvm"; }
getent group libvirt-qemu >/dev/null || {
    groupadd --system libvirt-qemu
    echo "install-deps.sh: created group libvirt-qemu"
}
getent passwd libvirt-qemu >/dev/null || {
    useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt \
        --no-create-home --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
    echo "install-deps.sh: created user libvirt-qemu"
}

# libvirt-python for whatever python3 is first on PATH (pyenv or Debian's).
if ! python3 -c 'import libvirt, libvirt_qemu' >/dev/null 2>&1; then
    echo "install-deps.sh: pip install libvirt-python"
    if python3 -m pip install -q libvirt-python; then
        echo "install-deps.sh: installed libvirt-python"
    else
        echo "install-deps.sh: WARNING: pip install libvirt-python failed" >&2
    fi
fi
echo "install-deps.sh: done"
