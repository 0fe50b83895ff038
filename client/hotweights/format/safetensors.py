"""A strict reader of safetensors headers. Bytes are never read here, only validated layouts.

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section.
Every entry's offsets are checked against the data section and against each other, so a loader
can trust them without re-checking.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from hotweights.errors import BadCheckpoint, shorten
from hotweights.format.dtypes import DType, lookup, nbytes_for
from hotweights.format.source import SourceFile, open_file

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Far above any real file (the largest published shards hold a few thousand tensors); a header of
# millions of tiny entries is refused before it costs the daemon minutes and gigabytes.
MAX_TENSORS_PER_FILE = 100_000
# Every entry has exactly one "data_offsets" key; the token cannot occur inside a JSON string (its quotes
# would be escaped there), so counting it bounds the entries before the parse builds a single object.
_ENTRY_TOKEN = b'"data_offsets"'
# That count can be dodged (a key spelled with \u escapes, or one entry carrying millions of junk keys),
# and json.loads holds the interpreter while it builds every object it parses. Every JSON member has a
# ':' and every further member or array element a ',' outside strings, so the number of those bytes
# bounds what the parse can build, whatever the spelling. A real entry needs 4 colons and 3 + ndim
# commas; the metadata a few of each.
_TOKENS_PER_TENSOR = 16
_METADATA_TOKENS = 8192
# Over the bound, a header up to this size is counted again with its strings taken out (colons and
# commas inside names or metadata values build nothing); a larger one is refused on the plain count.
_EXACT_COUNT_BYTES = 16 << 20
# Escape pairs first, then what lies between quotes: two linear scans (one pattern that allows escapes
# inside a string backtracks quadratically on an unclosed string of escaped quotes).
_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
# What a tensor entry may hold, as the reference writer writes it.
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# Dimensions and element counts travel as int64 (the wire, torch): one past that is no real tensor.
_MAX_DIM = 2**63
_BUDGET_EVERY = 4096  # entries checked between looks at the clock


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class FileHeader:
    path: Path
    size: int
    data_start: int
    tensors: list[TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    # The open file the header was read from, when its reader keeps it open for the fill.
    source: SourceFile | None = field(default=None, repr=False, compare=False)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_header(
    source: str | os.PathLike | SourceFile, max_tensors: int = MAX_TENSORS_PER_FILE, deadline: float | None = None
) -> FileHeader:
    """The validated header of a file, read through ``source`` when it is an open ``SourceFile`` (it stays
    open, and the header keeps it: the fill reads the same file); ``deadline`` (time.monotonic()) bounds
    the validation's time."""
    if isinstance(source, SourceFile):
        return _read_header(source, max_tensors, deadline)
    with open_file(source) as f:
        header = _read_header(f, max_tensors, deadline)
    header.source = None
    return header


def _read_header(f: SourceFile, max_tensors: int, deadline: float | None) -> FileHeader:
    path = Path(f.path)
    size = f.size
    if size < 8:
        raise BadCheckpoint(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length", path=str(path))
    (n,) = struct.unpack("<Q", f.pread(8, 0).ljust(8, b"\0"))
    if n > MAX_HEADER_BYTES:
        raise BadCheckpoint(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", path=str(path))
    if 8 + n > size:
        raise BadCheckpoint(
            f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)", path=str(path)
        )
    raw = f.pread(n, 8)
    header = parse_header(path, size, raw, max_tensors, deadline)
    header.source = f
    return header


def parse_header(
    path: Path, size: int, raw: bytes, max_tensors: int = MAX_TENSORS_PER_FILE, deadline: float | None = None
) -> FileHeader:
    where = f"{path}: "
    _check_count(where, path, raw.count(_ENTRY_TOKEN), max_tensors)
    _check_tokens(where, path, raw, max_tensors)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadCheckpoint(f"{where}header is not valid JSON: {exc}", path=str(path)) from None
    except RecursionError:
        raise BadCheckpoint(
            f"{where}header JSON is nested too deeply to be a safetensors header", path=str(path)
        ) from None
    if not isinstance(doc, dict):
        raise BadCheckpoint(f"{where}header is not a JSON object", path=str(path))
    data_start = 8 + len(raw)
    data_size = size - data_start
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadCheckpoint(f"{where}__metadata__ must map strings to strings", path=str(path))
    for key, value in metadata.items():
        _check_utf8(where, path, "__metadata__ key", key)
        _check_utf8(where, path, f"__metadata__ value of {key!r}", value)

    _check_count(where, path, len(doc), max_tensors)
    tensors: list[TensorEntry] = []
    for name, info in doc.items():
        tensors.append(_entry(where, path, name, info, data_start, data_size))
        if deadline is not None and len(tensors) % _BUDGET_EVERY == 0 and time.monotonic() > deadline:
            raise BadCheckpoint(
                f"{where}checking the header ran out of its time budget after {len(tensors)} of {len(doc)} tensors",
                path=str(path),
                tensors=len(doc),
            )
    ordered = sorted(tensors, key=lambda t: (t.begin, t.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise BadCheckpoint(
                f"{where}tensors {prev.name!r} and {cur.name!r} overlap "
                f"(bytes {prev.begin - data_start}-{prev.end - data_start} and "
                f"{cur.begin - data_start}-{cur.end - data_start})",
                path=str(path),
            )
    _check_covered(where, path, ordered, data_start, size)
    return FileHeader(path=path, size=size, data_start=data_start, tensors=tensors, metadata=metadata)


def _check_count(where: str, path: Path, n: int, max_tensors: int) -> None:
    if n > max_tensors:
        raise BadCheckpoint(
            f"{where}header lists {n} tensors; the limit is {max_tensors} per file",
            path=str(path),
            tensors=n,
            limit=max_tensors,
        )


def count_json_members(raw: bytes, limit: int) -> tuple[int, bool]:
    """(n, exact): an upper bound on the members and array elements of the JSON text ``raw`` (its ':'
    and ',' bytes), counted again outside strings (``exact``) when it is over ``limit`` and ``raw`` is
    at most 16 MiB. One or two scans of the bytes: what bounds a ``json.loads`` before it runs."""
    n = raw.count(b":") + raw.count(b",")
    if n > limit and len(raw) <= _EXACT_COUNT_BYTES:
        bare = _STRING.sub(b"", _ESCAPE.sub(b"", raw))
        return bare.count(b":") + bare.count(b","), True
    return n, False


def check_json_members(raw: bytes, limit: int, path: Path, what: str, needs: str) -> None:
    """Refuses, before the parse, JSON text ``raw`` (``what``, e.g. "header") holding more members and array
    elements than ``limit``; ``needs`` says what the limit is for."""
    n, exact = count_json_members(raw, limit)
    if n > limit:
        counted = "outside strings" if exact else "in its bytes"
        raise BadCheckpoint(
            f"{what} holds {n} JSON members and array elements (':' and ',' {counted}); {needs} needs at most {limit}",
            path=str(path),
            members=n,
            limit=limit,
        )


def _check_tokens(where: str, path: Path, raw: bytes, max_tensors: int) -> None:
    """Refuses, before the parse, a header whose JSON holds more members and array elements than
    ``max_tensors`` entries and their metadata need (one scan of the bytes per separator)."""
    limit = _TOKENS_PER_TENSOR * max_tensors + _METADATA_TOKENS
    check_json_members(raw, limit, path, f"{where}header", f"a header of at most {max_tensors} tensors")


def _check_covered(where: str, path: Path, ordered: list[TensorEntry], data_start: int, size: int) -> None:
    """Every byte of the data section belongs to exactly one tensor, as the reference loader demands:
    bytes no tensor claims are either a writer's bug or a place to smuggle data past a checksum."""
    cursor, previous = data_start, None
    for t in ordered:
        if t.begin > cursor:
            after = f"after {previous!r}" if previous else "before the first tensor"
            raise BadCheckpoint(
                f"{where}bytes {cursor - data_start}-{t.begin - data_start} of the data section belong to no "
                f"tensor (a hole {after}, before {t.name!r})",
                path=str(path),
                hole=[cursor - data_start, t.begin - data_start],
            )
        cursor, previous = max(cursor, t.end), t.name
    if cursor < size:
        raise BadCheckpoint(
            f"{where}{size - cursor} trailing byte(s) after the last tensor belong to no tensor "
            f"(data section ends at {cursor - data_start}, the file at {size - data_start})",
            path=str(path),
            trailing=size - cursor,
        )


def _check_utf8(where: str, path: Path, what: str, text: str) -> None:
    """JSON's escapes can spell lone surrogates, which no UTF-8 string holds: names are hashed and
    sent as UTF-8 later, so such a name is refused here, as the bad checkpoint it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        printable = text.encode("utf-8", "backslashreplace").decode("utf-8")
        raise BadCheckpoint(f"{where}{what} {printable!r} is not valid Unicode text", path=str(path)) from None


def _entry(where: str, path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    _check_utf8(where, path, "tensor name", name)
    if not isinstance(info, dict):
        raise BadCheckpoint(f"{where}tensor {name!r}: entry is not an object", path=str(path), tensor=name)
    extra = info.keys() - _ENTRY_KEYS
    if extra:
        key = min(extra)
        raise BadCheckpoint(
            f"{where}tensor {name!r}: entry holds {len(extra)} key(s) besides dtype, shape and data_offsets "
            f"(first {shorten(key)!r})",
            path=str(path),
            tensor=name,
        )
    dtype = lookup(str(info.get("dtype")), where=f"{where}tensor {name!r}: ")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadCheckpoint(
            f"{where}tensor {name!r}: shape {shape!r} is not a list of non-negative integers",
            path=str(path),
            tensor=name,
        )
    elements = 1
    for d in shape:
        elements *= d or 1  # a zero-size tensor's other dimensions must fit as well
    if elements >= _MAX_DIM:
        raise BadCheckpoint(
            f"{where}tensor {name!r}: shape {shape!r} is beyond what an int64 holds "
            f"(a dimension or the product of its dimensions is 2**63 or more)",
            path=str(path),
            tensor=name,
        )
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise BadCheckpoint(
            f"{where}tensor {name!r}: data_offsets {offsets!r} is not [begin, end]", path=str(path), tensor=name
        )
    begin, end = offsets
    if not 0 <= begin <= end:
        raise BadCheckpoint(
            f"{where}tensor {name!r}: data_offsets {offsets} are reversed or negative", path=str(path), tensor=name
        )
    if end > data_size:
        raise BadCheckpoint(
            f"{where}tensor {name!r}: data_offsets {offsets} end past the {data_size}-byte data section "
            f"(file truncated or offsets wrong)",
            path=str(path),
            tensor=name,
        )
    expected = nbytes_for(dtype, tuple(shape))
    if end - begin != expected:
        raise BadCheckpoint(
            f"{where}tensor {name!r}: shape {shape} of {dtype.name} needs {expected} bytes "
            f"but data_offsets span {end - begin}",
            path=str(path),
            tensor=name,
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)
