"""The fuzzer's fd dimensions and the oracles on the file and on QEMU, each shown firing:
the fd kinds made for real (testbed.fuzz.files), the spec's rules on a map's fd, flags and
alignment (testbed.fuzz.oracle, quoting the spec), the refusals QEMU owes none, and the
oracles on the back-end's file and the guest's view (testbed.fuzz.fileplay) against a
stand-in for QEMU's qtest that maps the file as told."""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from testbed.fuzz.fdspec import FdKind, FdSpec, FileOp, Op, SizeClass, size_class
from testbed.fuzz.fileplay import FilePlay
from testbed.fuzz.files import HOST_PATTERN, PATTERN, OpenFd, open_fd
from testbed.fuzz.generator import gen_after, gen_fd, generate
from testbed.fuzz.grammar import Action, BodyKind, ShmemConfig, encode
from testbed.fuzz.oracle import (
    FileImage,
    Judged,
    MapModel,
    file_change,
    guest_view_change,
    refusal,
)
from testbed.fuzz.states import StateDriver
from testbed.vhost_user.protocol import BackendRequest
from testbed.vhost_user.rules import SPEC, MapRule

M = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
MAP, UNMAP = int(BackendRequest.SHMEM_MAP), int(BackendRequest.SHMEM_UNMAP)


def _map(fd: str = f"memfd:{M}", **fields: int) -> Action:
    base = {"shmid": 0, "fd_offset": 0, "shm_offset": 0, "length": M, "flags": 1}
    return Action("after-driver-ok", MAP, BodyKind.MMAP, {**base, **fields}, fds=(fd,))


def _judged(model: MapModel, action: Action) -> list[Judged]:
    header, body = encode(action)
    return model.problems(action, header, body)


@pytest.fixture
def model() -> MapModel:
    return MapModel(ShmemConfig({0: 2 * M, 1: 2 * M}), started=True)


# -- the spec's rules on a map ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"shm_offset": 0x800}, "SHMEM_MAP with shm_offset not a page multiple accepted"),
        ({"length": M - 0x800}, "SHMEM_MAP with length not a page multiple accepted"),
        ({"fd_offset": 1}, "SHMEM_MAP with fd_offset not a page multiple accepted"),
    ],
)
def test_an_unaligned_map_must_be_refused(
    model: MapModel, fields: dict[str, int], words: str
) -> None:
    action = _map(f"memfd:{M}", **fields)
    [judged] = _judged(model, action)
    assert judged.text == words
    assert judged.spec == SPEC[MapRule.ALIGN] and "mmap(2)" in judged.spec
    assert not model.judgeable(action)


def test_an_unmap_must_name_a_whole_mapping(model: MapModel) -> None:
    model.apply(_map(length=2 * M))
    half = Action("after-driver-ok", UNMAP, BodyKind.MMAP, {"shmid": 0, "length": M})
    [judged] = _judged(model, half)
    assert judged.text == "SHMEM_UNMAP of a range that is not a whole live mapping accepted"
    assert "entirety of a valid mapped region" in judged.spec
    whole = Action("after-driver-ok", UNMAP, BodyKind.MMAP, {"shmid": 0, "length": 2 * M})
    assert _judged(model, whole) == [] and model.judgeable(whole)


@pytest.mark.parametrize(
    "fd, flags, words",
    [
        ("pipe", 1, "read-write SHMEM_MAP of a pipe accepted"),
        ("opath", 0, "read-only SHMEM_MAP of an O_PATH fd accepted"),
        ("eventfd", 1, "read-write SHMEM_MAP of an eventfd accepted"),
        (f"rofd:{M}", 1, "read-write SHMEM_MAP of a memfd opened read-only accepted"),
        (f"sealed:{M}", 1, "read-write SHMEM_MAP of a write-sealed memfd accepted"),
    ],
)
def test_a_map_of_an_fd_mmap_cannot_map_must_be_refused(
    model: MapModel, fd: str, flags: int, words: str
) -> None:
    [judged] = _judged(model, _map(fd, flags=flags))
    assert judged.text == words and judged.spec == SPEC["map"]
    assert not model.judgeable(_map(fd, flags=flags))


@pytest.mark.parametrize(
    "fd, flags",
    [
        (f"rofd:{M}", 0),  # read-only map of a read-only fd
        (f"rofile:{M}", 0),
        (f"sealed:{M}", 0),  # a write-sealed memfd maps read-only
        (f"memfd:{M // 2}", 1),  # a range past the file's end: mmap(2) maps it
        ("memfd:0", 1),
        (f"file:{M + 100}", 1),
    ],
)
def test_a_map_mmap_can_make_must_be_taken(model: MapModel, fd: str, flags: int) -> None:
    assert _judged(model, _map(fd, flags=flags)) == []
    assert model.judgeable(_map(fd, flags=flags))


def test_a_character_device_is_neither_owed_a_map_nor_a_refusal(model: MapModel) -> None:
    assert _judged(model, _map("chardev")) == []
    assert not model.judgeable(_map("chardev"))


def test_refusals_name_their_reason() -> None:
    ro = refusal(_map(f"rofd:{M}", flags=0), 1)
    assert ro.text == "read-only SHMEM_MAP of a memfd opened read-only refused (u64 1)"
    past = refusal(_map(f"memfd:{3 * M}", fd_offset=2 * M, length=2 * M), 1)
    assert past.text == "SHMEM_MAP whose fd range runs past the file's end refused (u64 1)"
    assert "must respond with zero when operation is successfully completed" in past.spec
    assert refusal(_map(f"file:{M}"), 1).text == "valid SHMEM_MAP of a regular file refused (u64 1)"


def test_size_classes() -> None:
    assert size_class(0, 0, M, PAGE) is SizeClass.EMPTY
    assert size_class(M, PAGE, M, PAGE) is SizeClass.SHORTER
    assert size_class(M + PAGE, PAGE, M, PAGE) is SizeClass.EQUAL
    assert size_class(2 * M, 0, M, PAGE) is SizeClass.LONGER
    assert size_class(M + 1, 0, M, PAGE) is SizeClass.ODD


# -- the file and the guest's view -----------------------------------------------------------


def test_qemu_changing_the_file_is_seen() -> None:
    spec = FdSpec(FdKind.MEMFD, 0)
    grown = file_change(FileImage(0, b""), FileImage(M, bytes(M)), spec)
    assert grown is not None and grown.text == "QEMU changed the size of a memfd from 0 to 1048576"
    bytes_ = file_change(FileImage(4, b"abcd"), FileImage(4, b"abXd"), spec)
    assert bytes_ is not None and "first at offset 2" in bytes_.text
    assert file_change(FileImage(4, b"abcd"), FileImage(4, b"abcd"), spec) is None
    # A guest write through a writable mapping is the one change that is expected.
    assert FileImage(4, b"abcd").written(1, b"XY") == FileImage(4, b"aXYd")


def test_a_refused_request_must_leave_the_guest_view_alone() -> None:
    changed = guest_view_change(b"\0" * 8, PATTERN, _map(), 1)
    assert changed is not None and "refused (u64 1) but the guest's view" in changed.text
    assert guest_view_change(PATTERN, PATTERN, _map(), 1) is None


@pytest.mark.parametrize("kind", list(FdKind))
def test_every_fd_kind_is_made_and_closed(kind: FdKind, tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    fd = open_fd(FdSpec(kind, 2 * PAGE), tmp_path)
    try:
        assert fd.sent >= 0
        image = fd.image()
        assert (image is not None) == FdSpec(kind).has_file
        if kind in (FdKind.ROFD, FdKind.ROFILE):
            with pytest.raises(OSError) as exc:
                os.write(fd.sent, b"x")
            assert exc.value.errno == errno.EBADF
        if kind is FdKind.SEALED:
            assert fd.apply(Op(FileOp.WRITE)) != ""  # the seal refuses the back-end too
        elif image is not None:
            assert fd.apply(Op(FileOp.WRITE, (8,))) == ""
            assert fd.read(8, 8) == HOST_PATTERN
            assert fd.apply(Op(FileOp.PUNCH, (0, PAGE))) == ""
            assert fd.apply(Op(FileOp.TRUNCATE, (PAGE,))) == ""
            assert fd.image() == FileImage(PAGE, bytes(PAGE))
    finally:
        fd.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_generated_fds_and_ops_cover_every_kind() -> None:
    import random

    rng = random.Random(1)
    kinds = {FdSpec.parse(gen_fd(rng, 0, M)).kind for _ in range(2000)}
    assert kinds == set(FdKind)
    ops = {Op.parse(t).op for _ in range(500) for t in gen_after(rng, 0, M)}
    assert ops == set(FileOp)
    cases = [generate("x86_64", 2, i) for i in range(300)]
    assert any(a.after for c in cases for a in c.actions)
    assert {a.fds[0].partition(":")[0] for c in cases for a in c.actions if a.fds} >= {
        "memfd",
        "file",
        "rofd",
    }


@dataclass
class FakeQtest:
    """BAR 4 as a QEMU would show it: a mapping of ``fd`` at ``base`` (read-write or
    read-only as ``writable``); ``drop`` loses every write, ``stale`` makes reads lie."""

    fd: OpenFd
    base: int
    fd_offset: int = 0
    writable: bool = True
    drop: bool = False
    stale: bool = False

    def write(self, addr: int, data: bytes) -> None:
        if self.writable and not self.drop:
            os.pwrite(self.fd.handle or -1, data, self.fd_offset + addr - self.base)

    def read(self, addr: int, length: int) -> bytes:
        if self.stale:
            return b"\xee" * length
        return os.pread(self.fd.handle or -1, length, self.fd_offset + addr - self.base)


@dataclass
class FakeMachine:
    qtest: FakeQtest


@dataclass
class FakePci:
    bars: dict[int, int] = field(default_factory=lambda: {4: 0xE0000000})


@dataclass
class FakeStates:
    """The parts of testbed.fuzz.states.StateDriver that FilePlay uses."""

    workdir: Path
    machine: FakeMachine | None = None
    pci: FakePci = field(default_factory=FakePci)
    where: str = ""

    def dead(self) -> Exception:
        return RuntimeError("QEMU died")

    def died_or(self, failure: Exception, grace: float) -> Exception:
        return failure


Rig = tuple[FilePlay, FakeStates, list[tuple[str, Judged]]]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    seen: list[tuple[str, Judged]] = []
    states = FakeStates(tmp_path)
    model = MapModel(ShmemConfig({0: 2 * M}), started=True)
    driver = cast(StateDriver, states)  # the stand-in has what FilePlay uses
    play = FilePlay(driver, model, lambda kind, judged, action: seen.append((kind, judged)))
    yield play, states, seen
    play.close()


def _played(
    rig: Rig,
    action: Action,
    verdict: int,
    **qtest: bool,
) -> list[str]:
    play, states, seen = rig
    opened = play.open(action)
    states.machine = FakeMachine(FakeQtest(opened[0], 0xE0000000, **qtest))
    expected = opened[0].image()
    if verdict == 0:
        play.model.apply(action)  # as the player's _judge does before after_reply
    try:
        play.after_reply(action, verdict, opened, expected, None)
        play.finish()
    finally:
        for fd in opened:
            fd.close()
    return [kind for kind, _ in seen]


def test_a_guest_write_through_a_read_only_mapping_is_seen(rig: Rig) -> None:
    action = dataclasses.replace(_map(flags=0), after=("guestwrite:16",))
    assert _played(rig, action, 0, writable=True) == ["readonly"]


def test_a_lost_write_through_a_writable_mapping_is_seen(rig: Rig) -> None:
    action = dataclasses.replace(_map(), after=("guestwrite:0",))
    assert _played(rig, action, 0, drop=True) == ["lost-write"]


def test_a_guest_read_that_is_not_the_file_is_seen(rig: Rig) -> None:
    action = dataclasses.replace(_map(), after=("write:64", "read:64"))
    assert _played(rig, action, 0, stale=True) == ["view"]


def test_a_clean_mapping_shows_nothing(rig: Rig) -> None:
    after = ("write:64", "read:64", "guestwrite:128", "truncate:4096", "extend:8192", "close")
    action = dataclasses.replace(_map(), after=after)
    assert _played(rig, action, 0) == []


def test_a_write_through_another_requests_range_lands_in_the_live_mapping(rig: Rig) -> None:
    """A refused map's guest write at a range an earlier read-only map still holds: the
    read-only mapping's oracle judges it (found by a campaign: it was taken for QEMU
    changing the file)."""
    play, states, seen = rig
    first = _map(flags=0, length=M)
    opened = play.open(first)
    states.machine = FakeMachine(FakeQtest(opened[0], 0xE0000000, writable=True))
    play.model.apply(first)
    play.after_reply(first, 0, opened, opened[0].image(), None)
    refused = dataclasses.replace(_map(shm_offset=M // 2, length=M), after=("guestwrite:64",))
    play.after_reply(refused, 1, [], None, None)
    play.finish()
    assert [kind for kind, _ in seen] == ["readonly"]


def test_a_write_across_a_mappings_edge_is_not_made(rig: Rig) -> None:
    tiny = dataclasses.replace(_map(length=1), after=("guestwrite:0",))  # an unaligned map
    assert _played(rig, tiny, 0) == []


def test_a_file_qemu_grew_is_seen(rig: Rig) -> None:
    play, _, seen = rig
    action = _map("memfd:0")
    opened = play.open(action)
    try:
        expected = opened[0].image()
        os.ftruncate(opened[0].handle or -1, M)  # what QEMU 11.1.3 does to an empty file
        play.after_reply(action, 0, opened, expected, None)
    finally:
        for fd in opened:
            fd.close()
    [(kind, judged)] = seen
    assert kind == "file" and judged.text.startswith("QEMU changed the size of a memfd from 0")


def test_a_case_names_its_device_and_keeps_its_draws() -> None:
    import json

    from testbed.fuzz.grammar import Case

    rng = generate("x86_64", 3, 7, "vhost-user-rng-pci")
    assert rng.device == "vhost-user-rng-pci"
    assert dataclasses.replace(rng, device=generate("x86_64", 3, 7).device) == generate(
        "x86_64", 3, 7
    )
    assert Case.from_json(json.loads(rng.dumps())) == rng
    old = json.loads(generate("x86_64", 3, 7).dumps())
    del old["device"]  # a corpus case from before --device
    assert Case.from_json(old).device == "vhost-user-test-device-pci"


def test_a_channel_closed_on_a_well_formed_request_is_an_oracle() -> None:
    """QEMU owes a well-formed SHMEM_MAP/UNMAP with NEED_REPLY an answer after DRIVER_OK:
    closing the channel instead is a finding (tests/data/fuzz-corpus/
    x86_64-opath-fd-closes-channel.json shows it against QEMU); a malformed one may close
    it (the spec lets a front-end drop a connection on a protocol error)."""
    from testbed.fuzz.player import Player

    good = _map("opath")
    assert Player._well_formed(good)
    assert not Player._well_formed(dataclasses.replace(good, size_delta=8))
    assert not Player._well_formed(dataclasses.replace(good, flags=0x1))  # no reply asked
    assert not Player._well_formed(dataclasses.replace(good, state="before-driver-ok"))
