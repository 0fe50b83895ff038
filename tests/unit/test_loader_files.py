"""Reads of the python workers and the cpu backend: a failed read names the file and the byte."""

from __future__ import annotations

import os

import pytest

from hotweights.errors import BackendError, BadCheckpoint
from hotweightsd.loaders import files


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
