#!/usr/bin/env bash
# One-command set-up: Debian packages, the Python venv, QEMU 11.1 and the guest images.
# Idempotent: every step checks first and does nothing when its work is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf 'setup: %s\n' "$*"; }

# 1. Python's venv module (Debian splits it out); everything else is installed by testbed.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        say "$PYTHON cannot create a venv; run as root: apt-get install -y python3-venv"
        exit 1
    fi
    say "installing Debian package python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends python3-venv >/dev/null
fi

# 2. The venv, reinstalled only when pyproject.toml changed.
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$VENV/.testbed-installed" 2>/dev/null || true)
if [[ "$want" != "$have" ]]; then
    say "installing testbed and its dependencies into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" > "$VENV/.testbed-installed"
else
    say "venv up to date"
fi

# 3. Debian packages and QEMU: skipped when the user gave both their own binaries.
if [[ -n "${TESTBED_QEMU_X86_64:-}" && -n "${TESTBED_QEMU_AARCH64:-}" ]]; then
    say "using your QEMU: $TESTBED_QEMU_X86_64, $TESTBED_QEMU_AARCH64"
else
    # Installs the missing Debian packages (scripts/debian-packages.txt) first, as root.
    "$VENV/bin/testbed" qemu provision --install-missing
fi

# 4. Guest images (cached by content hash): every kernel of every recipe (6.1, the default,
#    and 6.12, which the virtio-pmem and virtio-fs DAX scenarios choose; the nightly runs
#    both). 6.12 adds its suite's apt lists and two kernel packages to a fresh set-up; a
#    cached run stays well under a second.
"$VENV/bin/testbed" images build --arch all --kernel all

# 5. Back-ends from outside the project for the foreign-back-end scenarios: virtiofsd (sid)
#    and qemu-storage-daemon, run through the QEMU sysroot's loader. Needs the provisioned
#    sysroot: skipped when the user brought both QEMUs.
if [[ -z "${TESTBED_QEMU_X86_64:-}" || -z "${TESTBED_QEMU_AARCH64:-}" ]]; then
    say "outside back-ends (virtiofsd, qemu-storage-daemon): installed if missing"
    "$VENV/bin/python" -m testbed.host.backends
fi
say "done"
