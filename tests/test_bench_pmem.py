"""The pmem benchmark's parsing of the guest's timings (pure)."""

from __future__ import annotations

import pytest

from testbed.bench.pmem import PmemRun, parse_times
from testbed.errors import ParseError


def test_three_uptimes_make_write_and_read_seconds() -> None:
    assert parse_times("12.50 13.42 14.18\n") == PmemRun(0.92, 0.76)


@pytest.mark.parametrize("text", ["", "1.0 2.0", "a b c", "1 2 3 4"])
def test_anything_else_is_a_parse_error(text: str) -> None:
    with pytest.raises(ParseError, match="three uptimes"):
        parse_times(text)
