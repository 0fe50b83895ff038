"""``hotweights.json``: what a sharded checkpoint holds, and checking a directory against it.

The manifest records, for every file, its size and the xxhash64 of its whole content, and for every
output tensor its rank, file, dtype, shape, how it was cut from the source tensor (``split``: dim,
index, of n; absent when replicated) and its quantization. ``verify_checkpoint`` is what the
daemon's LoadModel runs before it trusts a directory:

- ``none``: nothing;
- ``fast``: the layout, every file's size, and every safetensors header against the manifest
  (reads only headers); a no-op for a directory without a manifest;
- ``full``: ``fast`` plus the xxhash64 of every byte of every file; needs a manifest.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from hotweights.errors import (
    BadCheckpoint,
    ChecksumMismatch,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    shorten,
)
from hotweights.format.checkpoint import MANIFEST_NAME, SHARD_RE, some_missing
from hotweights.format.safetensors import read_header
from hotweights.format.source import Allow, SourceFile, open_file, read_small

FORMAT = "hotweights-checkpoint"
FORMAT_VERSION = 1
MAX_AUX_FILES = 256  # config, tokenizer and generation files: a handful in practice
LEVELS = ("none", "fast", "full")
_HASH_CHUNK = 16 << 20


@dataclass
class Manifest:
    path: Path  # the hotweights.json file
    doc: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def tp_size(self) -> int:
        return int(self.doc["tp_size"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.doc["files"]

    @property
    def aux_files(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("aux_files", {})

    @property
    def tensors(self) -> list[dict[str, Any]]:
        return self.doc["tensors"]

    def rank_weight_bytes(self) -> list[int]:
        """Tensor data bytes each rank holds: what a loader puts in that GPU's memory."""
        out = [0] * self.tp_size
        for t in self.tensors:
            out[t["rank"]] += t["nbytes"]
        return out


def dumps_manifest(doc: dict[str, Any]) -> str:
    """JSON with one line per tensor entry: readable, diffable, and small even for thousands of tensors."""
    head = json.dumps({k: v for k, v in doc.items() if k != "tensors"}, indent=2)
    rows = ",\n    ".join(json.dumps(t, separators=(", ", ": ")) for t in doc.get("tensors", []))
    return head[:-2] + ',\n  "tensors": [\n    ' + rows + "\n  ]\n}\n"


def file_xxh64(source: Path | SourceFile, allow: Allow | None = None) -> str:
    """The xxhash64 of a file: through ``source`` when it is open, else opened as ``open_file`` does."""
    if not isinstance(source, SourceFile):
        with open_file(source, allow) as f:
            return file_xxh64(f)
    h = xxhash.xxh64()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(source.fd, [buf], offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest()


def load_manifest(directory: str | Path, allow: Allow | None = None) -> Manifest | None:
    """The manifest of a directory (or of the directory of a file inside it), None if it has none;
    malformed manifests raise BadCheckpoint. ``allow`` refuses where the manifest's path leads (model roots)."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(read_small(path, allow))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadCheckpoint(f"{path}: cannot read it as JSON: {exc}", path=str(path), file=MANIFEST_NAME) from None
    except RecursionError:
        raise BadCheckpoint(f"{path}: JSON nested too deeply", path=str(path), file=MANIFEST_NAME) from None
    _check_schema(path, doc)
    return Manifest(path, doc)


def _plain_name(name: str) -> bool:
    """A name of a file in the manifest's own directory: no directory part, not ``.`` or ``..``."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _check_schema(path: Path, doc: Any) -> None:
    def bad(why: str) -> BadCheckpoint:
        return BadCheckpoint(f"{path}: {why}", path=str(path), file=MANIFEST_NAME)

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not a hotweights manifest (format is not {FORMAT!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise bad(
            f"format_version {doc.get('format_version')!r} is not {FORMAT_VERSION}: written by another "
            f"hotweights version"
        )
    tp = doc.get("tp_size")
    if not isinstance(tp, int) or tp < 1:
        raise bad(f"tp_size {tp!r} is not a positive integer")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("lists no files")
    for name, info in files.items():
        m = SHARD_RE.match(name)
        if (
            not m
            or not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or not isinstance(info.get("xxh64"), str)
            or info.get("rank") != int(m.group(1))
        ):
            raise bad(f"entry for file {name!r} is malformed (needs a model-rank-R-part-P name, rank, size, xxh64)")
        if not 0 <= info["rank"] < tp:
            raise bad(f"file {name!r} is for rank {info['rank']}, outside tp_size {tp}")
    # Every rank needs a file: a tp_size beyond the files listed is refused here, before any check
    # builds anything as large as it (a 200-byte edit must not make verify allocate gigabytes).
    if tp > len(files):
        raise bad(f"tp_size {tp} exceeds the {len(files)} file(s) it lists; every rank needs at least one")
    aux = doc.get("aux_files", {})
    if not isinstance(aux, dict):
        raise bad("aux_files is not an object")
    if len(aux) > MAX_AUX_FILES:
        # verify opens each listed file: a manifest must not make the daemon hold thousands of them
        raise bad(f"lists {len(aux)} side files (aux_files); at most {MAX_AUX_FILES} are accepted")
    for name, info in aux.items():
        if (
            not _plain_name(name)
            or not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or not isinstance(info.get("xxh64"), str)
        ):
            raise bad(f"entry for file {name!r} is malformed (needs a file name in this directory, size, xxh64)")
    tensors = doc.get("tensors")
    if not isinstance(tensors, list):
        raise bad("has no tensors list")
    for i, t in enumerate(tensors):
        what = _tensor_entry_problem(t, files)
        if what is not None:
            named = isinstance(t, dict) and isinstance(t.get("name"), str)
            label = f"tensor entry {i}" + (f" ({shorten(t['name'])!r})" if named else "")
            raise bad(f"{label} {what}")


def _count(value: Any) -> bool:
    """A non-negative integer (JSON's true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry_problem(t: Any, files: dict[str, Any]) -> str | None:
    """What is wrong with one entry of the manifest's tensors list, None when nothing is."""
    if not isinstance(t, dict):
        return f"is not an object: {shorten(str(t))}"
    for key, kind in (("name", str), ("dtype", str), ("file", str), ("shape", list)):
        if not isinstance(t.get(key), kind):
            return f"has no {key} {kind.__name__} ({key} is {shorten(repr(t.get(key)))})"
    if t["file"] not in files:
        return f"names a file the manifest does not list ({shorten(t['file'])!r})"
    if not all(_count(d) for d in t["shape"]):
        return f"has shape {shorten(repr(t['shape']))}, not a list of non-negative integers"
    for key in ("rank", "nbytes", "offset"):
        if not _count(t.get(key)):
            return f"has {key} {shorten(repr(t.get(key)))}, not a non-negative integer"
    if t["rank"] != files[t["file"]]["rank"]:
        return f"says rank {t['rank']}, but its file {t['file']} is rank {files[t['file']]['rank']}'s"
    return None


def verify_checkpoint(
    path: Path, level: str, opened: dict[str, SourceFile] | None = None, allow: Allow | None = None
) -> None:
    """Check a checkpoint against its manifest; raise naming the first file that fails.

    Raises DataLoss (a file missing, of the wrong size, or whose header disagrees with the manifest),
    ChecksumMismatch (content differs), BadCheckpoint (the manifest is malformed, or the directory
    holds shard files the manifest does not list), and
    FailedPrecondition for ``full`` without a manifest. ``path`` may be the checkpoint directory or
    a file inside it. ``opened``: files the caller holds open, by name; they are checked through
    their descriptors (what a load then reads), not looked up again. Every other file it reads (the
    manifest, the files it lists) is opened once through ``open_file``, and ``allow`` refuses where
    each leads (model roots: OutsideModelRoots naming the file, a link judged by where it leads);
    one that is not a regular file is a BadCheckpoint.
    """
    if level not in LEVELS:
        raise InvalidArgument(f"verify level must be one of {', '.join(LEVELS)}, not {level!r}", level=level)
    if level == "none":
        return
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: no such file or directory", path=str(path))
    directory = path if path.is_dir() else path.parent
    manifest = load_manifest(directory, allow)
    if manifest is None:
        if level == "full":
            raise FailedPrecondition(
                f"{directory}: verify=full needs {MANIFEST_NAME} (it holds the checksums); this checkpoint has "
                f"none: load it with verify=fast or none, or shard it with `hotweights shard`",
                path=str(directory),
            )
        return
    _verify_layout(manifest)
    with ExitStack() as stack:
        files = dict(opened or {})
        for name in [*manifest.files, *manifest.aux_files]:
            if name not in files:  # what the checks then read, judged by ``allow`` where it leads
                files[name] = stack.enter_context(_open_listed(manifest, name, allow))
        _verify_sizes(manifest, files)
        if level == "full":
            # Hashes before headers: a flipped byte is then reported as what it is, content that changed.
            _verify_hashes(manifest, files)
        _verify_headers(manifest, files)


def _open_listed(m: Manifest, name: str, allow: Allow | None) -> SourceFile:
    p = m.directory / name
    try:
        return open_file(p, allow)
    except NotFound:
        raise DataLoss(f"{p}: missing: {MANIFEST_NAME} lists it", path=str(p), file=name) from None


def _verify_layout(m: Manifest) -> None:
    d = m.directory
    on_disk = {p.name for p in d.iterdir() if SHARD_RE.match(p.name)}
    extra = sorted(on_disk - set(m.files))
    if extra:
        raise BadCheckpoint(
            f"{d}: {extra[0]} is not in {MANIFEST_NAME} (a leftover of another run?); "
            f"the loader would read it as part of the checkpoint",
            path=str(d / extra[0]),
            file=extra[0],
        )
    ranks = {info["rank"] for info in m.files.values()}
    if len(ranks) != m.tp_size:  # every rank is below tp_size (the schema): a gap is found by counting
        raise BadCheckpoint(
            f"{m.path}: lists no files for rank(s) {some_missing(ranks | {m.tp_size})} of tp_size {m.tp_size}",
            path=str(m.path),
            file=MANIFEST_NAME,
        )


def _verify_sizes(m: Manifest, files: dict[str, SourceFile]) -> None:
    for name, info in [*m.files.items(), *m.aux_files.items()]:
        p = m.directory / name
        size = files[name].size
        if size != info["size"]:
            raise DataLoss(
                f"{p}: {size} bytes, {MANIFEST_NAME} says {info['size']} (truncated or rewritten)",
                path=str(p),
                file=name,
                expected=info["size"],
                actual=size,
            )


def _verify_headers(m: Manifest, files: dict[str, SourceFile]) -> None:
    expected: dict[str, dict[str, tuple[str, tuple[int, ...], int, int]]] = {name: {} for name in m.files}
    for t in m.tensors:
        expected[t["file"]][t["name"]] = (t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
    for name in m.files:
        p = m.directory / name
        try:
            header = read_header(files[name])
        except BadCheckpoint as exc:
            # The manifest vouches that this file was written whole: a header that no longer parses is damage.
            raise DataLoss(
                f"{exc.message} ({MANIFEST_NAME} lists it as written whole)", path=str(p), file=name
            ) from None
        want = expected[name]
        # Offsets are compared too: the same tensors reordered is another file, and the loader places by offset.
        found = {e.name: (e.dtype.name, e.shape, e.begin - header.data_start, e.nbytes) for e in header.tensors}
        for tname in sorted(set(want) | set(found)):
            if found.get(tname) != want.get(tname):
                what = (
                    "is missing"
                    if tname not in found
                    else "is not in the manifest"
                    if tname not in want
                    else f"is {found[tname][0]} {list(found[tname][1])} at offset {found[tname][2]}, the "
                    f"manifest says {want[tname][0]} {list(want[tname][1])} at {want[tname][2]}"
                    + (
                        f" (its data spans {found[tname][3]} bytes, the manifest's nbytes is {want[tname][3]})"
                        if found[tname][3] != want[tname][3]
                        else ""
                    )
                )
                raise DataLoss(f"{p}: tensor {tname!r} {what}", path=str(p), file=name, tensor=tname)


def _verify_hashes(m: Manifest, files: dict[str, SourceFile]) -> None:
    entries = [*m.files.items(), *m.aux_files.items()]
    workers = min(len(entries), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hw-verify") as pool:
        digests = list(pool.map(lambda e: file_xxh64(files[e[0]]), entries))
    for (name, info), digest in zip(entries, digests):
        if digest != info["xxh64"]:
            p = m.directory / name
            raise ChecksumMismatch(
                f"{p}: xxhash64 {digest} does not match {info['xxh64']} in {MANIFEST_NAME}",
                path=str(p),
                file=name,
                expected=info["xxh64"],
                actual=digest,
            )
