"""Finding and validating the files of a checkpoint before anything is read.

Layouts, in the order they are recognised:
- one ``.safetensors`` file: rank 0;
- a directory of ``model-rank-{r}-part-{p}.safetensors`` (``hotweights shard`` output): ranks from the names;
- a directory with ``model.safetensors.index.json``: the files it names, as rank 0;
- a directory of ``*.safetensors``: all of them, as rank 0.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from hotweights.errors import BadCheckpoint, HotweightsError, InvalidArgument, NotFound, shorten
from hotweights.format.safetensors import MAX_TENSORS_PER_FILE, FileHeader, check_json_members, read_header
from hotweights.format.source import DEFAULT_MAX_FILES, Allow, FileBudget, SourceFile, open_file, read_small

# One spelling per (rank, part): ASCII digits, no leading zeros (``shard_file_name`` writes these).
SHARD_RE = re.compile(r"^model-rank-(0|[1-9][0-9]*)-part-(0|[1-9][0-9]*)\.safetensors$")
# What a reader could take for a shard name: refused unless it is the one spelling above, so that
# ``model-rank-01-part-0`` beside ``model-rank-1-part-0`` is never resolved by directory order.
_SHARD_LIKE_RE = re.compile(r"^model-rank-\d+-part-\d+\.safetensors$")
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "hotweights.json"
# Files a serving process needs beside the weights (config, tokenizer, templates): tools that write a
# checkpoint in another layout copy them verbatim.
SERVING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


# Bytes of each file's tensor data the default version hashes at its start, middle and end.
FINGERPRINT_SAMPLE = 64 * 1024
# How fingerprint() is made: a new way gets a new number (1: headers and file sizes only).
FINGERPRINT_SCHEME = 2
# Defaults no real checkpoint reaches (the largest hold a few thousand tensors per rank); docs/limits.md.
MAX_TENSORS_PER_RANK = 1_000_000
HEADER_BUDGET_SECONDS = 30.0


@dataclass(frozen=True)
class HeaderLimits:
    """What a checkpoint's headers may make the reader build, and how long checking them may take."""

    max_tensors_per_file: int = MAX_TENSORS_PER_FILE
    max_tensors_per_rank: int = MAX_TENSORS_PER_RANK
    budget_seconds: float = HEADER_BUDGET_SECONDS


class _Reader:
    """Reads headers under one ``HeaderLimits``: counts each rank's tensors and keeps one deadline."""

    def __init__(self, limits: HeaderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.budget_seconds
        self.counts: dict[int, int] = {}

    def __call__(self, source: SourceFile, rank: int = 0) -> FileHeader:
        path = Path(source.path)
        lim = self.limits
        if time.monotonic() > self.deadline:
            raise BadCheckpoint(
                f"{path}: reading the checkpoint's headers ran out of its {lim.budget_seconds:g}s budget",
                path=str(path),
            )
        header = read_header(source, lim.max_tensors_per_file, self.deadline)
        n = self.counts[rank] = self.counts.get(rank, 0) + len(header.tensors)
        if n > lim.max_tensors_per_rank:
            raise BadCheckpoint(
                f"{path}: rank {rank} lists {n} tensors in its files up to this one; "
                f"the limit is {lim.max_tensors_per_rank} per rank",
                path=str(path),
                rank=rank,
                tensors=n,
                limit=lim.max_tensors_per_rank,
            )
        return header


@dataclass
class RankFiles:
    rank: int
    files: list[FileHeader]

    @property
    def nbytes(self) -> int:
        return sum(f.data_bytes for f in self.files)


@dataclass
class Checkpoint:
    """A checkpoint's layout and headers; its files stay open (``sources``) until ``close()``."""

    path: Path
    layout: str
    ranks: list[RankFiles]
    sources: list[SourceFile] = field(default_factory=list, repr=False)
    # What may be opened (model roots), for the fingerprint's read of hotweights.json.
    allow: Allow | None = field(default=None, repr=False, compare=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def close(self) -> None:
        for f in self.sources:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)

    @property
    def manifest_path(self) -> Path | None:
        """The hotweights.json of the checkpoint's directory (of the file's directory for one file)."""
        p = (self.path if self.path.is_dir() else self.path.parent) / MANIFEST_NAME
        return p if p.is_file() else None

    def fingerprint(self) -> str:
        """A short content-derived version, the same for the same bytes on any node.

        It hashes every header and file size, the xxhash64 of every file that hotweights.json lists,
        and ``FINGERPRINT_SAMPLE`` bytes at the start, middle and end of each file's tensor data. The
        samples tell retrained weights of the same shapes apart where no manifest covers every
        byte, for three small reads per file (docs/operations.md); weights that differ only between
        the samples of a checkpoint without a manifest need ``--version``.
        """
        if self._fingerprint is None:
            h = xxhash.xxh64(f"hotweights-fingerprint-{FINGERPRINT_SCHEME}".encode())
            sums = self._manifest_checksums()
            for r in self.ranks:
                for f in r.files:
                    h.update(f"{r.rank}:{f.path.name}:{f.size}:{sums.get(f.path.name, '')}:".encode())
                    for t in sorted(f.tensors, key=lambda t: t.name):
                        h.update(f"{t.name}|{t.dtype.name}|{t.shape}|{t.begin}|{t.end};".encode())
                    _hash_samples(h, f, self.allow)
            self._fingerprint = h.hexdigest()[:12]
        return self._fingerprint

    def _manifest_checksums(self) -> dict[str, str]:
        """File name -> xxhash64 from hotweights.json; empty without one. A manifest that cannot be read
        adds nothing here: verify reports it."""
        path = self.manifest_path
        if path is None:
            return {}
        try:
            files = json.loads(read_small(path, self.allow)).get("files")
        except (HotweightsError, OSError, ValueError, AttributeError, RecursionError):
            return {}
        if not isinstance(files, dict):
            return {}
        return {
            name: info["xxh64"]
            for name, info in files.items()
            if isinstance(info, dict) and isinstance(info.get("xxh64"), str)
        }


def _hash_samples(h: xxhash.xxh64, f: FileHeader, allow: Allow | None) -> None:
    """Mixes into ``h`` the bytes at fixed places of ``f``'s tensor data (all of it when it is small)."""
    start, end = f.data_start, f.size
    n = FINGERPRINT_SAMPLE
    if end - start <= 3 * n:
        spans = [(start, end - start)]
    else:
        spans = [(start, n), (start + (end - start - n) // 2, n), (end - n, n)]
    with contextlib.ExitStack() as stack:
        source = f.source
        if source is None or source.closed:
            source = stack.enter_context(open_file(f.path, allow))
        for offset, length in spans:
            data = source.pread(length, offset)
            h.update(f"{offset}+{len(data)}:".encode())
            h.update(data)


def open_checkpoint(
    path: str | Path,
    allow: Allow | None = None,
    max_files: int = DEFAULT_MAX_FILES,
    limits: HeaderLimits | None = None,
) -> Checkpoint:
    """Finds a checkpoint's files, opens each once (``open_file``) and reads its header through it.

    ``allow`` refuses a real path (model roots: the checkpoint's own path and every file, judged by
    where its links lead); ``max_files`` bounds the files held open; ``limits`` what the headers may
    make the reader build. On any error every file opened so far is closed. The caller closes the
    returned checkpoint.
    """
    where = shorten(str(path))
    if "\0" in str(path):
        raise InvalidArgument(f"{where!r}: a path cannot contain a NUL byte")
    try:
        path = Path(path).expanduser()
        if allow is not None:
            allow(where, os.path.realpath(path))  # before looking: a path outside the roots is not even probed
        exists = path.exists()
    except RuntimeError as exc:  # ~user naming no user
        raise NotFound(f"{where}: {exc}", path=where) from None
    except OSError as exc:  # a name too long, a loop of links, a component that is not a directory
        raise NotFound(f"{where}: {exc.strerror or exc}", path=where) from None
    where = shorten(str(path))
    if not exists:
        raise NotFound(f"{where}: no such file or directory", path=where)
    budget = FileBudget(where, max_files, allow)
    try:
        ckpt = _open(path, where, budget, _Reader(limits or HeaderLimits()))
    except BaseException:
        budget.close_all()
        raise
    ckpt.sources = budget.files
    ckpt.allow = allow
    return ckpt


def _open(path: Path, where: str, budget: FileBudget, read: _Reader) -> Checkpoint:
    if not path.is_dir():
        if path.suffix != ".safetensors":
            raise BadCheckpoint(f"{where}: not a .safetensors file", path=where)
        if _SHARD_LIKE_RE.match(path.name) or (path.parent / MANIFEST_NAME).exists():
            # One part (or one rank) alone would be served as a whole model, missing the other parts.
            raise BadCheckpoint(
                f"{where}: is one file of a sharded checkpoint (a model-rank-R-part-P name, or a "
                f"{MANIFEST_NAME} beside it); load its directory {shorten(str(path.parent))}",
                path=where,
            )
        header = read(budget.open(path))
        return _checked(Checkpoint(path.resolve(), "file", [RankFiles(0, [header])]))
    path = path.resolve()

    shards = _sharded(path, budget, read)
    if shards is not None:
        return _checked(Checkpoint(path, "sharded", shards))
    index = path / INDEX_NAME
    if index.exists():
        return _checked(Checkpoint(path, "indexed", [RankFiles(0, _indexed(path, index, budget, read))]))
    files = sorted(p for p in path.glob("*.safetensors") if not p.is_dir())
    if not files:
        raise BadCheckpoint(f"{path}: no .safetensors files in this directory", path=str(path))
    budget.reserve(len(files))
    return _checked(Checkpoint(path, "directory", [RankFiles(0, [read(budget.open(p)) for p in files])]))


def _sharded(path: Path, budget: FileBudget, read: _Reader) -> list[RankFiles] | None:
    found: dict[int, dict[int, Path]] = {}
    for p in path.iterdir():
        m = SHARD_RE.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
        elif _SHARD_LIKE_RE.match(p.name):
            raise BadCheckpoint(
                f"{path}: {shorten(p.name)!r} is not a shard name hotweights reads (model-rank-R-part-P with "
                f"ASCII digits and no leading zeros): rename or remove it",
                path=str(p),
                file=p.name,
            )
    if not found:
        return None
    # Numbers come from file names: a gap is found by counting, never by building the range, which
    # one stray name with a huge number would make as large as that number.
    world = max(found) + 1
    if world != len(found):
        raise BadCheckpoint(
            f"{path}: sharded checkpoint lacks rank(s) {some_missing(found)} (found ranks up to {world - 1})",
            path=str(path),
        )
    ranks = []
    budget.reserve(sum(len(parts) for parts in found.values()))
    for r in range(world):
        parts = found[r]
        if max(parts) + 1 != len(parts):
            raise BadCheckpoint(f"{path}: rank {r} lacks part(s) {some_missing(parts)}", path=str(path), rank=r)
        ranks.append(RankFiles(r, [read(budget.open(parts[p]), r) for p in sorted(parts)]))
    return ranks


def some_missing(present: Collection[int], most: int = 5) -> str:
    """The first few numbers below max(present) that are absent (there must be one), and how many more."""
    missing = list(itertools.islice((i for i in range(max(present)) if i not in present), most))
    more = max(present) + 1 - len(present) - len(missing)
    return f"[{', '.join(map(str, missing))}{f', and {more} more' if more else ''}]"


def _indexed(path: Path, index: Path, budget: FileBudget, read: _Reader) -> list[FileHeader]:
    raw = read_small(index, budget.allow)
    # One weight_map entry per tensor: a ':' and a ','. Counted before the parse, which holds the interpreter.
    limit = 2 * read.limits.max_tensors_per_rank + 8192
    check_json_members(
        raw,
        limit,
        index,
        f"{index}:",
        f"an index of at most {read.limits.max_tensors_per_rank} tensors (the per-rank limit)",
    )
    try:
        doc = json.loads(raw)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadCheckpoint(
            f"{index}: not a valid index (needs a JSON object with a 'weight_map' object)", path=str(index)
        ) from None
    if not weight_map:
        raise BadCheckpoint(
            f"{index}: weight_map is empty, so the index names no files (the weight files beside it "
            f"would be ignored); fix or remove the index",
            path=str(index),
        )
    for tensor, name in weight_map.items():  # before any set or sort of them, which a non-string breaks
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name.startswith("."):
            raise BadCheckpoint(
                f"{index}: weight_map entry {shorten(tensor)!r} names an invalid file {shorten(repr(name))}",
                path=str(index),
                tensor=shorten(tensor),
            )
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (path / name).exists():
            raise BadCheckpoint(f"{index}: weight_map names {name}, which does not exist", path=str(index), file=name)
    budget.reserve(len(names))
    headers = [read(budget.open(path / name)) for name in names]
    where = {t.name: h.path.name for h in headers for t in h.tensors}
    for tensor, file in weight_map.items():
        if where.get(tensor) != file:
            raise BadCheckpoint(
                f"{index}: weight_map puts {tensor!r} in {file}, but that file does not hold it",
                path=str(index),
                tensor=tensor,
            )
    return headers


def _checked(ckpt: Checkpoint) -> Checkpoint:
    for r in ckpt.ranks:
        seen: dict[str, Path] = {}
        for f in r.files:
            for t in f.tensors:
                if t.name in seen:
                    raise BadCheckpoint(
                        f"duplicate tensor {t.name!r} in {seen[t.name].name} and {f.path.name} (rank {r.rank})",
                        tensor=t.name,
                        path=str(f.path),
                    )
                seen[t.name] = f.path
    return ckpt
