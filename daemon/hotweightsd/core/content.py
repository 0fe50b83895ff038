"""What a loaded version was read from, to tell a repeated load of the same content from a different one.

A version's content is the checkpoint's fingerprint (``Checkpoint.fingerprint``: every header, file name
and size, the manifest's checksums, a few sampled blocks of tensor data) and, for each file, its resolved
path, size, mtime_ns, inode and device. Two loads have the same content when all of it matches: a file
rewritten in place (same header, new data) changes its mtime or inode, a copy of the checkpoint
elsewhere changes the paths and inodes. Two versions under different names hold the same bytes (and
share memory) when their files are the same inodes, whatever the paths (``same_files``).

A fingerprint is compared only with one made the same way (``scheme``): a version restored from a state
file written by an older daemon carries the old kind, and for it the files' identities decide alone.

A version in an engine layout also records what its layout did (``recipe``, a digest of the fused,
padded and dropped tensors): the layout is cut from config.json beside the files, so the same files
under another config are other content. "" is unknown (no layout, or an older state file) and matches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hotweights.errors import BadCheckpoint
from hotweights.format.checkpoint import FINGERPRINT_SCHEME, Checkpoint


@dataclass(frozen=True)
class FileId:
    path: str
    size: int
    mtime_ns: int
    inode: int
    # The filesystem the inode belongs to; -1 when unknown (a state file written before it was recorded).
    dev: int = -1


@dataclass(frozen=True)
class ContentId:
    fingerprint: str
    files: tuple[FileId, ...]
    scheme: int = FINGERPRINT_SCHEME  # state files written before it was recorded hold scheme 1
    recipe: str = ""

    def _same_recipe(self, other: ContentId) -> bool:
        return not self.recipe or not other.recipe or self.recipe == other.recipe

    def _same_fingerprint(self, other: ContentId) -> bool:
        return self.scheme != other.scheme or self.fingerprint == other.fingerprint

    def differences(self, other: ContentId) -> list[str]:
        """What differs from ``other`` (the new load), in words; empty when the content is the same."""
        out: list[str] = []
        mine = {f.path: f for f in self.files}
        theirs = {f.path: f for f in other.files}
        gone = sorted(set(mine) - set(theirs))
        new = sorted(set(theirs) - set(mine))
        if gone:
            out.append(f"files only in the loaded version: {_some(gone)}")
        if new:
            out.append(f"files only in the new checkpoint: {_some(new)}")
        for path in sorted(set(mine) & set(theirs)):
            a, b = mine[path], theirs[path]
            if a.size != b.size:
                out.append(f"{path}: size {a.size} -> {b.size}")
            elif a.inode != b.inode:
                out.append(f"{path}: replaced (inode {a.inode} -> {b.inode})")
            elif a.mtime_ns != b.mtime_ns:
                out.append(f"{path}: modified since it was loaded (mtime changed)")
        if not self._same_fingerprint(other):
            out.append(f"content digest {self.fingerprint} -> {other.fingerprint}")
        if not self._same_recipe(other):
            out.append("the engine layout cut from the config beside the files differs (config.json changed)")
        return out

    def same_files(self, other: ContentId) -> bool:
        """Whether ``other`` was read from the very same files, wherever their paths: the same
        fingerprint and the same (size, mtime_ns, inode) for every file. A symlinked or hard-linked
        path to the files is the same; a copy (other inodes) is not, as telling a copy from other
        data would mean reading every byte of both."""
        if not self._same_fingerprint(other) or not self._same_recipe(other) or len(self.files) != len(other.files):
            return False
        if any(f.dev < 0 for f in (*self.files, *other.files)):
            return False  # an inode number alone does not name a file across filesystems
        return sorted(map(_stat, self.files)) == sorted(map(_stat, other.files))

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "scheme": self.scheme,
            "files": [[f.path, f.size, f.mtime_ns, f.inode, f.dev] for f in self.files],
            **({"recipe": self.recipe} if self.recipe else {}),
        }

    @classmethod
    def from_json(cls, doc: Any) -> ContentId | None:
        if not isinstance(doc, dict):
            return None
        # [path, size, mtime_ns, inode] in state files written before the device was recorded
        files = tuple(
            FileId(str(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[4]) if len(f) > 4 else -1) for f in doc["files"]
        )
        return cls(str(doc["fingerprint"]), files, int(doc.get("scheme", 1)), str(doc.get("recipe", "")))


def content_of(ckpt: Checkpoint, recipe: str = "") -> ContentId:
    """The checkpoint's content identity: its fingerprint and one stat per file (and ``recipe``, the
    digest of what an engine layout does to it)."""
    files = []
    for r in ckpt.ranks:
        for f in r.files:
            if f.source is not None:  # the file as it was opened: no second lookup by path
                path, st = f.source.real, f.source.stat
            else:
                path = os.path.realpath(f.path)
                try:
                    st = os.stat(path)
                except OSError as exc:
                    raise BadCheckpoint(f"{path}: cannot stat: {exc.strerror}", path=path) from None
            files.append(FileId(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return ContentId(ckpt.fingerprint(), tuple(sorted(files, key=lambda f: f.path)), recipe=recipe)


def _stat(f: FileId) -> tuple[int, int, int, int]:
    return f.dev, f.inode, f.size, f.mtime_ns


def _some(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
