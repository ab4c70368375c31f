"""Test access to the segment's attach validation with arbitrary bytes."""

from __future__ import annotations

import mmap

from noodle import layout as L
from noodle.segment import Segment, validate_header


def segment_from_bytes(pool: str, data: bytes) -> Segment:
    """Validate and map ``data`` the way attach does a real segment (the
    attach fuzzer's entry): PoolCorrupt or a usable Segment."""
    mm = mmap.mmap(-1, max(len(data), 1))
    mm[: len(data)] = data
    try:
        header = validate_header(bytes(mm[: min(len(data), L.HEADER_SIZE)]), len(data), pool)
        return Segment(pool, mm, header, owner=False)
    except BaseException:
        mm.close()
        raise
