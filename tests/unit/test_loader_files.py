"""Reads of the python workers and the cpu backend: a failed read names the file and the byte."""

from __future__ import annotations

import os

import pytest

from hotweights.errors import BackendError, BadCheckpoint
from hotweightsd.loaders import files
from hotweightsd.loaders.plan import ReadChunk


def test_a_failed_buffered_read_names_the_file_and_the_byte(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        with pytest.raises(BackendError) as ei:
            files.read_exact(fd, memoryview(bytearray(4096)), 8192, "/models/x.safetensors")
    finally:
        os.close(fd)
    assert ei.value.op == "pread" and ei.value.code == 21
    assert ei.value.message == "/models/x.safetensors: pread at byte 8192 failed: Is a directory"


def test_a_short_buffered_read_is_still_a_truncated_checkpoint(tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(bytes(100))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(BadCheckpoint, match="truncated: ended at byte 100"):
            files.read_exact(fd, memoryview(bytearray(200)), 0, str(p))
    finally:
        os.close(fd)


def _read_mid_file(tmp_path, monkeypatch, cut) -> tuple[list[int], bool]:
    """Reads 4 blocks from byte 100 of a 5-block file O_DIRECT, reads cut by ``cut`` (see cut_reads):
    the offsets read at, and whether the chunk came back exact."""
    data = os.urandom(5 * 4096 + 123)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    chunk = ReadChunk(0, 100, 4 * 4096, ())
    buf = memoryview(bytearray(6 * 4096))
    fd = os.open(p, os.O_RDONLY)
    try:
        at = cut_reads(monkeypatch, cut)
        skip = files.read_direct(fd, buf, chunk, str(p))
    finally:
        os.close(fd)
    return at, bytes(buf[skip : skip + chunk.length]) == data[100 : 100 + chunk.length]


def test_an_o_direct_read_cut_inside_a_block_mid_file_is_read_again_not_taken_for_the_end(tmp_path, monkeypatch):
    at, exact = _read_mid_file(tmp_path, monkeypatch, lambda k: 4096 + 1000 if k == 0 else None)
    assert at == [0, 4096]  # the cut block again, from its start
    assert exact


def test_an_o_direct_read_ending_inside_the_files_last_block_is_its_end(tmp_path, monkeypatch):
    data = os.urandom(2 * 4096 + 123)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    buf = memoryview(bytearray(3 * 4096))
    try:
        at = cut_reads(monkeypatch, lambda k: 3 * 4096 if k == 0 else None)
        skip = files.read_direct(fd, buf, ReadChunk(0, 4096, 4096 + 123, ()), str(p))
        assert at == [4096] and bytes(buf[skip : skip + 4096 + 123]) == data[4096:]
        with pytest.raises(BadCheckpoint, match="truncated: ended at byte 8315"):
            files.read_direct(fd, buf, ReadChunk(0, 4096, 4096 + 124, ()), str(p))
    finally:
        os.close(fd)


def cut_reads(monkeypatch, cut) -> list[int]:
    """Read number k (from 0) gets only ``cut(k)`` bytes where that is not None; returns the offsets read at."""
    real, at = os.preadv, []

    def preadv(fd: int, bufs: list, offset: int) -> int:
        to = cut(len(at))
        at.append(offset)
        if to is not None:
            bufs = [memoryview(bufs[0])[:to]]
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return at


def test_a_retry_cut_shorter_than_the_read_before_still_reads_the_chunk_exactly(tmp_path, monkeypatch):
    at, exact = _read_mid_file(tmp_path, monkeypatch, lambda k: {0: 4096 + 1000, 1: 500}.get(k))
    assert at[:3] == [0, 4096, 4096]
    assert exact


def test_reads_cut_short_again_and_again_are_an_io_error_not_a_truncated_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(5 * 4096 + 123))
    fd = os.open(p, os.O_RDONLY)
    try:
        at = cut_reads(monkeypatch, lambda k: 1000)
        with pytest.raises(BackendError, match="cut short 8 times in a row"):
            files.read_direct(fd, memoryview(bytearray(6 * 4096)), ReadChunk(0, 100, 4 * 4096, ()), str(p))
    finally:
        os.close(fd)
    assert len(at) == 1 + files.DIRECT_RETRIES
