"""Fills for the native engine's tests: files of random bytes with segments scattered over them, the
bytes a fill of them must leave, and the call kinds of the stand-in driver (``fake_libcuda.c``)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from hotweightsd.core.layout import Segment

MiB = 1024 * 1024
# fake_fail's kinds, as fake_libcuda.c numbers them
COPY, EVENT_SYNC, STREAM_SYNC, EVENT_RECORD = range(4)
KINDS = (COPY, EVENT_SYNC, STREAM_SYNC, EVENT_RECORD)


def random_layout(tmp_path, seed: int, nfiles: int = 3):
    """Files of random bytes and segments scattered over them; returns (paths, segments, allocation size)."""
    rng = random.Random(seed)
    paths, segs, dst = [], [], 0
    for f in range(nfiles):
        pos = rng.randrange(8, 5000)
        for _ in range(rng.randrange(1, 25)):
            n = rng.choice([1, 7, 256, 4096, rng.randrange(1, 700_000)])
            pos += rng.choice([0, 0, 3, 5000, 2 * MiB])
            dst = -(-dst // 256) * 256
            segs.append(Segment(f, pos, n, 0, dst))
            pos += n
            dst += n
        p = tmp_path / f"f{f}.bin"
        p.write_bytes(rng.randbytes(pos + rng.randrange(0, 3)))
        paths.append(str(p))
    return paths, segs, dst


def expected(paths: Sequence[str], segs: Sequence[Segment], size: int) -> bytes:
    out = bytearray(size)
    datas = [open(p, "rb").read() for p in paths]
    for s in segs:
        out[s.offset : s.offset + s.length] = datas[s.file][s.file_offset : s.file_offset + s.length]
    return bytes(out)
