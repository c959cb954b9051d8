#!/usr/bin/env bash
# One-command set-up: Debian packages, the Python venv, QEMU 11.1 and the guest images.
# Idempotent: every step checks first and does nothing when its work is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf 'setup: %s\n' "$*"; }

# 1. Debian packages (installed only when missing; needs root, otherwise says what to run).
missing=()
while read -r pkg _; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done < scripts/debian-packages.txt
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=("python3-venv")
fi
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        say "missing Debian packages: ${missing[*]}"
        say "run as root: apt-get update && apt-get install -y ${missing[*]}"
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages present"
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

# 3. QEMU: skipped when the user gave both their own binaries.
if [[ -n "${TESTBED_QEMU_X86_64:-}" && -n "${TESTBED_QEMU_AARCH64:-}" ]]; then
    say "using your QEMU: $TESTBED_QEMU_X86_64, $TESTBED_QEMU_AARCH64"
else
    "$VENV/bin/testbed" qemu provision
fi

# 4. Guest images (cached by content hash).
"$VENV/bin/testbed" images build --arch all
say "done"
