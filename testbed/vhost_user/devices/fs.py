"""virtio-fs (virtio-id 26) over our FUSE server (testbed.fuse), DAX through region 0.

The device (VIRTIO 1.2 section 5.11; Linux fs/fuse/virtio_fs.c; include/uapi/linux/
virtio_fs.h):

- queues: 0 is "hiprio" (FORGET, BATCH_FORGET; Linux never sends INTERRUPT: "TODO
  interrupts"), 1..n are the request queues (virtio_fs_setup_vqs(): ``fs->nvqs =
  VQ_REQUEST + fs->num_request_queues``);
- config space ``struct virtio_fs_config { __u8 tag[36]; __le32 num_request_queues; __le32
  notify_buf_size; }``: notify_buf_size means something only with VIRTIO_FS_F_NOTIFICATION,
  which we do not offer, so the space is 40 bytes (QEMU's test device: config_size=40);
- shared-memory region 0 (VIRTIO_FS_SHMCAP_ID_CACHE) is the DAX window, when there is one;
- a request is one chain: fuse_in_header and the arguments device-readable, fuse_out_header
  and the reply's arguments device-writable (virtio_fs_enqueue_req()). The driver trusts the
  out-header: copy_args_from_argbuf() takes ``remaining = req->out.h.len -
  sizeof(req->out.h)``, so the reply is written exactly as the server made it, and the used
  length is its size. A FORGET is one readable buffer and nothing writable
  (send_forget_request(): ``virtqueue_add_outbuf(vq, &sg, 1, forget, GFP_ATOMIC)``); it is
  given back with used length 0 (virtio_fs_hiprio_done_work() frees it).

Threading. The serving thread pops chains and calls ``handle``. FUSE_SETUPMAPPING,
FUSE_REMOVEMAPPING and FUSE_DESTROY may call the mapper, i.e. send SHMEM_MAP/UNMAP and wait
for QEMU's answer, which QEMU gives only after the serving thread has answered the
SET_MEM_TABLE it sends meanwhile -- so with a DAX window these chains are answered
:class:`Later`: the FUSE server serves them on the back-end's deferred worker and the
back-end completes them, out of order, on the serving thread (backend/vrings.py). The FUSE
server is touched by one thread at a time, in arrival order (its own lock would otherwise
make the serving thread wait for QEMU): while anything is queued for the worker, every
chain after it goes there too (the "lane"); with the lane empty, a chain is served inline
on the serving thread. A device stop (reset, disconnect) is queued the same way, so it
takes effect after what was accepted before it; requests of the run that ended are then
not served (their chains were forgotten with the ring).
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.device import ShmemLayout
from testbed.errors import ConfigError, FuseProtocolError, RingError
from testbed.fuse.codec import NO_REPLY, RemovemappingArgs, decode_request, encode_error
from testbed.fuse.dax import LiveMapping
from testbed.fuse.server import TAG_MAX, FuseServer, SessionState
from testbed.fuse.structs import ForgetIn, ReadIn, SetupmappingIn
from testbed.fuse.wire import InHeader, Opcode, OutHeader, opcode_name
from testbed.resource import Closeable
from testbed.vhost_user.devices.base import Completion, DeviceHost, DeviceModel, Later, Problem
from testbed.vhost_user.devices.fsdax import CACHE_SHMID, MapperStats, ShmemMapper
from testbed.vhost_user.memory import GuestMemory
from testbed.vhost_user.virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, Chain

log = logging.getLogger(__name__)

VIRTIO_ID_FS = 26
HIPRIO_QUEUE = 0
CONFIG = struct.Struct(f"<{TAG_MAX}sI")
CONFIG_SIZE = CONFIG.size  # 40: tag and num_request_queues, no notify_buf_size
# "FUSE_INTERRUPT and FUSE_FORGET requests are only sent on the dedicated hiprio queue"
# (the virtio-fs spec proposal); Linux sends BATCH_FORGET nowhere, FORGET on hiprio only.
HIPRIO_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})
# What may reach the mapper (SHMEM_MAP/UNMAP), i.e. wait for QEMU.
MAPPER_OPCODES = frozenset({Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING, Opcode.DESTROY})
_IN_HEADER = InHeader.FORMAT.size
_OUT_HEADER = OutHeader.FORMAT.size


class _Lane:
    """How many FUSE requests (or resets) wait for or run on the deferred worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued = 0

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._queued == 0

    def submit(self, host: DeviceHost, what: str, action: Callable[[], None]) -> None:
        def run() -> None:
            try:
                action()
            finally:
                with self._lock:
                    self._queued -= 1

        with self._lock:
            self._queued += 1
        try:
            host.defer(what, run)
        except BaseException:
            with self._lock:
                self._queued -= 1
            raise


class VirtioFsDevice(DeviceModel, Closeable):
    """virtio-fs over a FuseServer sharing the host directory ``share``.

    ``tag``: what the guest mounts (1..36 bytes of UTF-8, no NUL). ``window_size``: the
    DAX cache window (shared-memory region 0), 0 for none. ``num_request_queues``: request
    queues after the hiprio one. The other keywords go to the FuseServer (map_alignment,
    inode_dax, timeout, max_pages). ``ring_features``: the ring features offered (the
    device has no feature bits of its own).
    """

    name = "virtio-fs"

    def __init__(
        self,
        share: Path,
        *,
        tag: str,
        window_size: int = 0,
        num_request_queues: int = 1,
        ring_features: int = F_INDIRECT_DESC | F_EVENT_IDX,
        map_alignment: int | None = None,
        inode_dax: bool = False,
        timeout: float = 1.0,
        max_pages: int = 32,
    ) -> None:
        if num_request_queues < 1:
            # virtio_fs_setup_vqs(): "if (fs->num_request_queues == 0) return -EINVAL;"
            raise ConfigError(f"virtio-fs: {num_request_queues} request queues, give at least 1")
        layout = ShmemLayout({CACHE_SHMID: window_size} if window_size else {})
        super().__init__(
            num_queues=1 + num_request_queues,
            layout=layout,
            features=ring_features,
            config_size=CONFIG_SIZE,
        )
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.window_size = window_size
        self.mapper = ShmemMapper() if window_size else None
        self.server = FuseServer(
            share,
            self.mapper,
            tag=tag,
            window_size=window_size,
            map_alignment=map_alignment,
            max_pages=max_pages,
            timeout=timeout,
            inode_dax=inode_dax,
        )
        self.idle_fds = self.server.held_fds
        """The host fds the FUSE server holds with no session (the share's root): the
        level held_fds returns to after DESTROY or a reset."""
        self._lock = threading.Lock()
        self._lane = _Lane()
        self._host: DeviceHost | None = None  # while started
        self._worker: DeviceHost | None = None  # the last host: its worker outlives a stop
        self._run = 0  # bumped by every start and stop
        self._requests: Counter[str] = Counter()
        self._error_replies: Counter[str] = Counter()
        self.resets = 0
        """Sessions ended by a device stop (reset, disconnect) rather than DESTROY."""

    # --- what a test or a scenario reads -----------------------------------------------

    @property
    def requests(self) -> dict[str, int]:
        """FUSE requests received, by opcode name, as they came off the rings."""
        with self._lock:
            return dict(self._requests)

    @property
    def error_replies(self) -> dict[str, int]:
        """Error replies sent, by opcode name."""
        with self._lock:
            return dict(self._error_replies)

    @property
    def live_mappings(self) -> dict[int, int]:
        """What QEMU holds mapped in the window now, by the mapper's account of acked
        SHMEM_MAP/UNMAP and resets (window offset -> length); {} without DAX."""
        return self.mapper.live if self.mapper is not None else {}

    @property
    def server_mappings(self) -> dict[int, LiveMapping]:
        """The FUSE server's model of the same (it must agree with live_mappings)."""
        return self.server.mappings

    @property
    def mapper_stats(self) -> MapperStats | None:
        return self.mapper.stats if self.mapper is not None else None

    @property
    def held_fds(self) -> int:
        """Host fds the FUSE server holds now (root, looked-up nodes, open handles). The
        live mappings hold none of ours: SHMEM_MAP hands QEMU a duplicate."""
        return self.server.held_fds

    def unsettled(self) -> list[str]:
        """What is not back where it was before the mount -- the invariant after DESTROY,
        a reset or a stop: nothing mapped, the FUSE server's fds at their idle level. []
        when settled."""
        found = []
        if self.live_mappings:
            found.append(f"SHMEM_MAP without SHMEM_UNMAP at {self.live_mappings}")
        if self.server_mappings:
            found.append(f"the FUSE server still models mappings at {list(self.server_mappings)}")
        if self.held_fds != self.idle_fds:
            found.append(f"{self.held_fds} host fds held, {self.idle_fds} before the mount")
        return found

    # --- the device ------------------------------------------------------------------------

    def config(self) -> bytes:
        # The tag "is not NUL-terminated if the encoded bytes take up the entire field".
        return CONFIG.pack(self.tag.encode(), self.num_request_queues)

    def start(self, host: DeviceHost) -> None:
        super().start(host)
        with self._lock:
            self._host = self._worker = host
            self._run += 1
        if self.mapper is not None:
            self.mapper.attach(host)

    def stop(self) -> None:
        super().stop()
        with self._lock:
            self._host = None
            self._run += 1
        if self.mapper is not None:
            self.mapper.attach(None)  # nothing more may reach a stopped device
        self._on_lane("virtio-fs reset", self._reset)

    def _reset(self) -> None:
        """The device stopped: QEMU dropped the window's mappings itself, so the session
        ends without unmapping (FuseServer.reset(unmap=False)) and the account records
        the drop. Runs with nothing else in the FUSE server."""
        if self.server.state is SessionState.READY:
            self.resets += 1
        self.server.reset(unmap=False)
        if self.mapper is not None:
            dropped = self.mapper.forget_all()
            if dropped:
                log.info("virtio-fs: the reset dropped %d mapping(s) in QEMU", dropped)

    def _on_lane(self, what: str, action: Callable[[], None]) -> None:
        """Run ``action`` now if nothing waits for the worker, else after what does."""
        with self._lock:
            worker = self._worker
        if worker is None or self._lane.idle:
            action()
        else:
            self._lane.submit(worker, what, action)

    def handle(self, queue: int, chain: Chain, memory: GuestMemory) -> Completion | Later:
        if not 0 <= queue < self.num_queues:
            raise RingError(
                "device-request",
                f"virtio-fs has {self.num_queues} queues; got a chain on queue {queue}",
                head=chain.head,
            )
        raw = chain.read(memory)
        if len(raw) < _IN_HEADER:
            # No unique to answer to: Linux could not match any reply with a request.
            problem = Problem(
                "device-request",
                f"request of {len(raw)} bytes, shorter than fuse_in_header ({_IN_HEADER}): "
                "it cannot be answered",
            )
            self._count(self._requests, "SHORT")
            return Completion(0, "SHORT", -1, {"bytes": raw.hex()}, {}, (problem,))
        header = InHeader.unpack(raw[:_IN_HEADER])
        name = opcode_name(header.opcode)
        self._count(self._requests, name)
        request = describe_request(header, raw)
        problems = self._placement_problems(queue, header, chain)
        with self._lock:
            host, run = self._host, self._run
        waits = self.mapper is not None and header.opcode in MAPPER_OPCODES
        if host is None or (not waits and self._lane.idle):
            # Inline: nothing here waits for QEMU and nothing is queued for the worker (so
            # the FUSE server is free) -- or the device is not started, in which case the
            # mapper fails at once without reaching QEMU.
            reply = self._serve(raw, header)
            return self._written(chain, memory, header, reply, request, problems)

        def start(later: Later) -> None:
            what = f"FUSE {name} (unique {header.unique})"
            self._lane.submit(host, what, lambda: self._serve_later(later, chain, raw, header, run))

        return Later(name, header.opcode, start, request, problems)

    def _serve_later(
        self, later: Later, chain: Chain, raw: bytes, header: InHeader, run: int
    ) -> None:
        """On the worker: serve the request, hand the answer to the back-end."""
        with self._lock:
            stale = run != self._run
        if stale:
            # The device stopped since the request came: the FUSE session it belonged to is
            # gone, so it is not served. Its chain was forgotten with its ring, and the
            # answer is dropped -- unless the ring was not stopped, when an error beats a
            # request that never ends.
            log.info("virtio-fs: %s (unique %d) not served: the device stopped since it came",
                     later.name, header.unique)  # fmt: skip
            reply = _eio(header)
        else:
            reply = self._serve(raw, header)

        def finish(memory: GuestMemory) -> Completion:
            # On the serving thread, with the memory table current then.
            return self._written(chain, memory, header, reply, later.request, ())

        later.resolve(finish)

    def _serve(self, raw: bytes, header: InHeader) -> bytes | None:
        """The FUSE server's reply; an error reply if the server itself fails (our bug:
        the guest still gets an answer rather than a request that never ends)."""
        try:
            reply = self.server.handle(raw)
        except Exception:
            log.exception("virtio-fs: the FUSE server failed on %s (unique %d)",
                          opcode_name(header.opcode), header.unique)  # fmt: skip
            reply = _eio(header)
        failed = reply is not None and OutHeader.unpack(reply[:_OUT_HEADER]).error != 0
        if failed:
            self._count(self._error_replies, opcode_name(header.opcode))
        return reply

    def _written(
        self,
        chain: Chain,
        memory: GuestMemory,
        header: InHeader,
        reply: bytes | None,
        request: dict[str, Any],
        problems: tuple[Problem, ...],
    ) -> Completion:
        """Write ``reply`` into the chain's writable buffers, exactly; the Completion."""
        name = opcode_name(header.opcode)
        if reply is None:
            return Completion(0, name, header.opcode, request, {}, problems)
        out = OutHeader.unpack(reply[:_OUT_HEADER])
        if len(reply) > chain.writable_bytes:
            # A shorter write would leave out.len promising bytes that are not there; the
            # error alone fits in any buffer that can hold an out-header.
            problems += (
                Problem(
                    "device-request",
                    f"{name} (unique {header.unique}): reply of {len(reply)} bytes, the "
                    f"driver's writable buffers hold {chain.writable_bytes}",
                ),
            )
            if chain.writable_bytes < _OUT_HEADER:
                return Completion(0, name, header.opcode, request, {}, problems)
            reply = encode_error(header.unique, errno.EIO)
            out = OutHeader.unpack(reply)
            self._count(self._error_replies, name)
        written = chain.write(memory, reply)
        described = {"unique": out.unique, "error": out.error, "len": out.len}
        return Completion(written, name, header.opcode, request, described, problems)

    def _placement_problems(
        self, queue: int, header: InHeader, chain: Chain
    ) -> tuple[Problem, ...]:
        if queue == HIPRIO_QUEUE and header.opcode not in HIPRIO_OPCODES:
            # Linux's hiprio completion frees the buffer unread: a reply there is lost.
            return (
                Problem(
                    "device-request",
                    f"{opcode_name(header.opcode)} on the hiprio queue, which carries only "
                    "FORGET, BATCH_FORGET and INTERRUPT",
                ),
            )
        if header.opcode not in NO_REPLY and chain.writable_bytes < _OUT_HEADER:
            return (
                Problem(
                    "device-request",
                    f"{opcode_name(header.opcode)} with {chain.writable_bytes} writable bytes: "
                    f"no room for fuse_out_header ({_OUT_HEADER})",
                ),
            )
        return ()

    def _count(self, counter: Counter[str], name: str) -> None:
        with self._lock:
            counter[name] += 1

    def close(self) -> None:
        """Close the FUSE server: its live mappings are unmapped if the device can still
        reach QEMU, and every host fd is closed. Close it after the back-end. Idempotent."""
        self.server.close()

    def describe(self) -> str:
        return (
            f"virtio-fs(tag {self.tag!r}, {self.num_request_queues} request queue(s), "
            f"window {self.window_size:#x})"
        )


def _eio(header: InHeader) -> bytes | None:
    """An EIO error reply to the request (None for one that has no reply)."""
    return None if header.opcode in NO_REPLY else encode_error(header.unique, errno.EIO)


def describe_request(header: InHeader, raw: bytes) -> dict[str, Any]:
    """The trace's view of a request: the header's unique, nodeid and len, and for the
    requests a scenario counts or pairs with the channel, their arguments."""
    out: dict[str, Any] = {"unique": header.unique, "nodeid": header.nodeid, "len": header.len}
    try:
        args = decode_request(raw).args
    except FuseProtocolError:
        return out  # the server answers EPROTO and keeps the evidence
    if isinstance(args, SetupmappingIn):
        out |= {
            "foffset": args.foffset,
            "moffset": args.moffset,
            "length": args.len,
            "flags": args.flags,
        }
    elif isinstance(args, RemovemappingArgs):
        out["ranges"] = [[one.moffset, one.len] for one in args.entries]
    elif isinstance(args, ReadIn):
        out |= {"fh": args.fh, "offset": args.offset, "size": args.size}
    elif isinstance(args, ForgetIn):
        out["nlookup"] = args.nlookup
    return out
