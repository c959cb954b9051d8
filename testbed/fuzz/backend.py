"""Our back-end, bent per case: the case's feature offer, its GET_SHMEM_CONFIG reply (any
nregions, sizes, padding, truncation, extra bytes, flags) and its mutations of the replies
to chosen front-end requests. Everything else is the back-end as it always is."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from testbed.device import ShmemLayout, base_device
from testbed.errors import ProtocolError
from testbed.fuzz.files import memfd
from testbed.fuzz.grammar import U64_MASK, Case, ReplyKind, ReplyMutation, ShmemConfig
from testbed.limits import MAX_SHMEM_REGIONS, PAGE_SIZE
from testbed.vhost_user.backend import Backend, offer
from testbed.vhost_user.backend.dispatch import Dispatcher
from testbed.vhost_user.backend.handlers import Reply
from testbed.vhost_user.backend.session import Session
from testbed.vhost_user.connection import Message
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import FLAG_REPLY, VERSION, Header, ProtocolFeature, Request


class FuzzDispatcher(Dispatcher):
    """The back-end's dispatcher with the case's reply mutations and its own
    GET_SHMEM_CONFIG reply (any nregions, sizes, padding, truncation, extra bytes, flags)."""

    def __init__(self, *wiring: Any, case: Case, mutations: tuple[ReplyMutation, ...]) -> None:
        # ``wiring``: what the back-end built its own dispatcher with (Dispatcher.build_like).
        super().__init__(*wiring)
        self.case = case
        # One mutation per reply: of two that name the same one, the last is played.
        self.mutations = {(m.request, m.nth): m for m in mutations}
        self.counts: dict[int, int] = {}
        self.fired: list[ReplyMutation] = []
        self._active: ReplyMutation | None = None

    def dispatch(self, s: Session, msg: Message, request: Request) -> None:
        n = self.counts[int(request)] = self.counts.get(int(request), 0) + 1
        mutation = self.mutations.get((int(request), n))
        self._active = mutation
        if mutation is not None:
            self.fired.append(mutation)
            if mutation.kind == ReplyKind.HANGUP:
                raise ProtocolError(f"fuzz: hang-up at {request.name}")
            if mutation.kind == ReplyKind.DELAY:
                # The fault itself (a slow answer), not a wait for anything.
                time.sleep(min(mutation.value, 1000) / 1000)
        try:
            if request is Request.GET_SHMEM_CONFIG:
                config = self.case.config
                self._reply(s, request, Reply(shmem_reply_body(config), config.flags))
            else:
                super().dispatch(s, msg, request)
            if mutation is not None and mutation.kind == ReplyKind.ACK:
                body = (mutation.value & U64_MASK).to_bytes(8, "little")
                self.send(s, Header(int(request), VERSION | FLAG_REPLY, 8), body)
        finally:
            self._active = None

    def _reply(self, s: Session, request: Request, reply: Reply) -> None:
        m = self._active
        flags = VERSION | FLAG_REPLY if reply.flags is None else reply.flags
        body = reply.body
        code = int(request)
        size_lie = 0
        fds: list[int] = []
        if m is not None:
            if m.kind == ReplyKind.FLAGS:
                flags = m.value
            elif m.kind == ReplyKind.SIZE:
                body = body[: max(0, len(body) + m.value)] + bytes(max(0, m.value))
            elif m.kind == ReplyKind.LIE:
                size_lie = m.value
            elif m.kind == ReplyKind.VALUE and len(body) == 8:
                body = (m.value & U64_MASK).to_bytes(8, "little")
            elif m.kind == ReplyKind.BYTES:
                body = bytes(b ^ (m.value & 0xFF) for b in body)
            elif m.kind == ReplyKind.REQUEST:
                code = m.value
        header = Header(code, flags & 0xFFFFFFFF, max(0, len(body) + size_lie))
        try:
            if m is not None and m.kind == ReplyKind.FDS:
                fds = [memfd(PAGE_SIZE) for _ in range(max(1, min(m.value, 8)))]
            self.send(s, header, body, fds, allow_size_mismatch=True)
        finally:
            for fd in fds:
                os.close(fd)


def shmem_reply_body(config: ShmemConfig) -> bytes:
    """The case's GET_SHMEM_CONFIG reply body: its sizes (any, not a layout: shmids and
    sizes cut to the wire's widths) encoded as our back-end encodes raw sizes, then bent
    as the case says (nregions, padding, truncation, extra bytes)."""
    sizes = {shmid % MAX_SHMEM_REGIONS: size & U64_MASK for shmid, size in config.sizes.items()}
    body = offer.shmem_config_body(ShmemLayout(), Faults(shmem_raw_sizes=sizes))
    return offer.bend_shmem_config(
        body,
        nregions=config.count if config.nregions is None else config.nregions,
        padding=config.padding,
        truncate=config.truncate,
        extra=config.extra,
    )


class FuzzBackend(Backend):
    """Backend whose dispatcher plays a case's reply mutations."""

    def __init__(
        self, path: Path, case: Case, mutations: tuple[ReplyMutation, ...], **kwargs: Any
    ) -> None:
        offer = case.offer
        base = base_device(case.device)
        # A device that refuses a back-end without PROTOCOL_F_CONFIG gets it offered.
        config = int(ProtocolFeature.CONFIG) if base.needs_config else 0
        faults = Faults(
            no_shmem=offer.shmem_bit is None,
            shmem_bit=22 if offer.shmem_bit is None else offer.shmem_bit,
            extra_features=offer.extra | config,
            withhold_features=offer.withhold,
        )
        kwargs.setdefault("num_queues", base.queues)
        self.fuzz: FuzzDispatcher | None = None

        def wrap(base: Dispatcher) -> Dispatcher:
            self.fuzz = base.build_like(
                functools.partial(FuzzDispatcher, case=case, mutations=mutations)
            )
            return self.fuzz

        super().__init__(path, ShmemLayout(), faults=faults, wrap_dispatcher=wrap, **kwargs)
