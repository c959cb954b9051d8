"""Guest-less reproducers of the bugs in what QEMU does with a back-end's fds and files
(found with the fuzzer's fd dimensions, testbed.fuzz.fdspec): each a started device, one
SHMEM_MAP of a chosen fd, and the check that shows the bug.
"""

from __future__ import annotations

import contextlib

from testbed.bugs.recipe_kit import M, bar4_address, started
from testbed.bugs.recording import CLOSED, Recipe, RecipeFailed, Run
from testbed.device import ShmemLayout
from testbed.errors import PeerClosed, QemuExited
from testbed.fuzz.fdspec import FdKind, FileOp, Op
from testbed.vhost_user.protocol import BackendRequest, MMap

MAP = BackendRequest.SHMEM_MAP
LAYOUT = ShmemLayout({0: 2 * M, 1: 2 * M})


def shmem_map_empty_file_grown(run: Run) -> None:
    """An empty memfd mapped read-write: QEMU grows the back-end's file to the range."""
    started(run, LAYOUT)
    empty = run.fd(FdKind.MEMFD, 0)
    run.channel(MAP, MMap(0, 0, 0, M, 1).pack(), [empty])
    run.check_file_size(empty, 0, "QEMU changed the size of a memfd from 0 to 1048576")


def shmem_map_past_eof_refused(run: Run) -> None:
    """A 3 MiB memfd, the 2 MiB at fd_offset 2 MiB asked for (as virtio-fs DAX maps a 2 MiB
    chunk of a small file): refused, although mmap(2) maps a range past a file's end."""
    started(run, LAYOUT)
    small = run.fd(FdKind.MEMFD, 3 * M)
    result = run.channel(MAP, MMap(0, 2 * M, 0, 2 * M, 1).pack(), [small])
    run.check_result(result, 1, "SHMEM_MAP whose fd range runs past the file's end refused")


def shmem_map_truncated_file_sigbus(run: Run) -> None:
    """A live mapping whose file the back-end truncates; the guest reads the range."""
    machine = started(run, LAYOUT)
    mem = run.fd(FdKind.MEMFD, M, b"mapped")
    result = run.channel(MAP, MMap(0, 0, 0, M, 1).pack(), [mem])
    if run.results[result] != 0:
        raise RecipeFailed(f"QEMU refused the SHMEM_MAP (u64 {run.results[result]})")
    run.file_op(mem, Op(FileOp.TRUNCATE, (0,)))
    address = bar4_address(machine) if run.base.shmem_bar else None
    if address is None:
        return  # the guest cannot reach a region of this device: nothing reads the file
    with contextlib.suppress(QemuExited, PeerClosed):  # QEMU dies instead of answering
        run.qtest_read(address, 8)
    run.wait_exit()


def shmem_map_unaligned_accepted(run: Run) -> None:
    """A map at shm_offset 0x800: not a page multiple, so QEMU must refuse it."""
    started(run, LAYOUT)
    mem = run.fd(FdKind.MEMFD, M)
    result = run.channel(MAP, MMap(0, 0, 0x800, 0x1000, 1).pack(), [mem])
    run.check_result(result, 0, "SHMEM_MAP with shm_offset not a page multiple accepted")


def backend_channel_opath_fd_closes_channel(run: Run) -> None:
    """A SHMEM_MAP carrying an O_PATH fd: QEMU closes the whole back-end channel."""
    started(run, LAYOUT)
    opath = run.fd(FdKind.OPATH)
    result = run.channel(MAP, MMap(0, 0, 0, M, 1).pack(), [opath], may_fail=True)
    run.check_result(
        result, CLOSED, "QEMU closed the back-end channel on SHMEM_MAP with an O_PATH fd"
    )


FD_RECIPES: dict[str, Recipe] = {
    "shmem-map-empty-file-grown": shmem_map_empty_file_grown,
    "shmem-map-past-eof-refused": shmem_map_past_eof_refused,
    "shmem-map-truncated-file-sigbus": shmem_map_truncated_file_sigbus,
    "shmem-map-unaligned-accepted": shmem_map_unaligned_accepted,
    "backend-channel-opath-fd-closes-channel": backend_channel_opath_fd_closes_channel,
}
