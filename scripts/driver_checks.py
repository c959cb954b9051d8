#!/usr/bin/env python3
"""By-hand checks that the guest drivers of the coming virtio-pmem and virtio-fs DAX
scenarios come up on a chosen guest kernel (no scenario uses them yet).

    .venv/bin/python scripts/driver_checks.py pmem --arch x86_64 --kernel 6.12
    .venv/bin/python scripts/driver_checks.py virtiofs --arch aarch64 --kernel 6.12

pmem: QEMU's own virtio-pmem-pci in front of a sparse file (x86_64 only: QEMU 11.1's
qemu-system-aarch64 has no virtio-pmem, its virt machine does not select
VIRTIO_PMEM_SUPPORTED), the image's virtio_pmem and ext4 loaded on demand, busybox mke2fs
(ext2, 4 KiB blocks) on /dev/pmem0, mounted by ext4 with -o dax=always, a dd write and
read, and the bytes seen in the host's file. virtiofs: virtiofsd (testbed.host.backends)
behind the relay with a 64 MiB cache window injected as region 0; the share mounts and a
file goes both ways; with -o dax=always it mounts but reads fail with ENOSYS (virtiofsd
answers no FUSE_SETUPMAPPING), which is expected.

Exit 0 when every check passed. Needs `make setup` (images of both kernels, virtiofsd).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from testbed.host.backends import ensure_virtiofsd
from testbed.vm import GuestVM

MIB = 1 << 20

PMEM_GUEST = r"""
i=0; until [ -b /dev/pmem0 ] || [ $i -ge 250 ]; do usleep 20000; i=$((i+1)); done
echo "pmem0 bytes: $(($(cat /sys/block/pmem0/size) * 512)) dax: $(cat /sys/block/pmem0/queue/dax)"
mke2fs -b 4096 /dev/pmem0 >/dev/null && mkdir -p /mnt/pm
if mount -t ext4 -o dax=always /dev/pmem0 /mnt/pm; then
  grep pmem0 /proc/mounts
  s=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero of=/mnt/pm/f bs=1M count=48 conv=fsync
  e=$(cut -d' ' -f1 /proc/uptime); echo "write 48 MiB: $s -> $e s"
  s=$(cut -d' ' -f1 /proc/uptime); dd if=/mnt/pm/f of=/dev/null bs=1M
  e=$(cut -d' ' -f1 /proc/uptime); echo "read 48 MiB: $s -> $e s"
  echo MARK > /mnt/pm/hello; sync; umount /mnt/pm
fi
dmesg | grep -E 'pmem|EXT4-fs' | tail -4
"""

VIRTIOFS_GUEST = r"""
dmesg | grep -E 'virtiofs .*Cache len'
mkdir -p /mnt/s /mnt/d
mount -t virtiofs share /mnt/s && cat /mnt/s/hello.txt && echo from the guest > /mnt/s/guest.txt
umount /mnt/s
mount -t virtiofs -o dax=always share /mnt/d && grep /mnt/d /proc/mounts && cat /mnt/d/hello.txt
umount /mnt/d 2>/dev/null; true
"""


def _show(label: str, started: float, vm: GuestVM) -> None:
    print(
        f"[{vm.arch} {vm.image.kernel_name} ({vm.image.kernel_release}): {label} "
        f"{time.monotonic() - started:.2f} s]",
        flush=True,
    )


def check_pmem(arch: str, kernel: str | None, size_mib: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="pmem-") as tmp:
        backing = Path(tmp) / "pmem.img"
        with backing.open("wb") as fh:
            fh.truncate(size_mib * MIB)
        mark = f"hello-through-dax-{time.time_ns()}"
        qemu_args = [
            # merged by QEMU into the VM's own -m 512M. Without maxmem QEMU 11.1 refuses the
            # device on q35: "the configuration is not prepared for memory devices (e.g.,
            # for memory hotplug), consider specifying the maxmem option" (no slots needed)
            "-m", "512M,maxmem=2G",
            "-object", f"memory-backend-file,id=pm,share=on,mem-path={backing},size={size_mib}M",
            "-device", "virtio-pmem-pci,memdev=pm,id=pmem0",
        ]  # fmt: skip
        started = time.monotonic()
        with GuestVM(arch, kernel=kernel, extra_qemu_args=qemu_args) as vm:
            _show("booted in", started, vm)
            started = time.monotonic()
            vm.load_modules("virtio_pmem", "ext4")
            _show("load_modules('virtio_pmem', 'ext4') in", started, vm)
            out = vm.run(PMEM_GUEST.replace("MARK", mark), timeout=600)
        text = (out.stdout + out.stderr).decode(errors="replace")
        print(text, end="")
        seen = mark.encode() in backing.read_bytes()
    print(f"host: the guest's file is in the backing file: {seen}")
    return (
        f"pmem0 bytes: {size_mib * MIB} dax: 1" in text
        and "/dev/pmem0 /mnt/pm ext4 rw,relatime,dax=always" in text
        and seen
    )


def check_virtiofs(arch: str, kernel: str | None) -> bool:
    virtiofsd = ensure_virtiofsd(log=lambda _: None)
    with tempfile.TemporaryDirectory(prefix="share-") as tmp:
        share = Path(tmp)
        (share / "hello.txt").write_text("hello from the host\n")
        cmd = (
            f"{virtiofsd} --socket-path={{socket}} --shared-dir={share} --tag share --sandbox none"
        )
        started = time.monotonic()
        with GuestVM(
            arch, kernel=kernel, backend_cmd=cmd, regions={0: 64 * MIB}, num_vqs=2, config_size=40
        ) as vm:
            _show("booted in", started, vm)
            vm.load_modules("virtiofs")  # a no-op where the driver is built in (6.12)
            out = vm.run(VIRTIOFS_GUEST, timeout=300)
        text = (out.stdout + out.stderr).decode(errors="replace")
        print(text, end="")
        back = (share / "guest.txt").read_text().strip() if (share / "guest.txt").exists() else ""
    print(f"host: guest.txt holds {back!r}")
    return (
        "hello from the host" in text
        and back == "from the guest"
        and "virtiofs rw,relatime,dax=always" in text
        and "Function not implemented" in text  # the expected ENOSYS under DAX
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("pmem", "virtiofs"))
    parser.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"))
    parser.add_argument("--kernel", default=None, help="a recipe kernel (default: the default)")
    parser.add_argument("--size-mib", type=int, default=64, help="pmem size (default 64)")
    args = parser.parse_args()
    if args.check == "pmem":
        if args.arch != "x86_64":
            parser.error("QEMU 11.1's qemu-system-aarch64 has no virtio-pmem-pci")
        ok = check_pmem(args.arch, args.kernel, args.size_mib)
    else:
        ok = check_virtiofs(args.arch, args.kernel)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
