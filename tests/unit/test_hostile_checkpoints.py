"""Checkpoint files a clumsy operator or a stray file can put in a model directory: refused with a
BadCheckpoint whose cost and message do not grow with numbers or text taken from the files."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hotweights import errors
from hotweights.format.checkpoint import open_checkpoint
from hotweights.format.safetensors import read_header
from support import child_env
from support.ckpt_tools import raw_file

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _shard(d, rank, part):
    return raw_file(d / f"model-rank-{rank}-part-{part}.safetensors", {"w": F32x2}, b"\0" * 8)


@pytest.mark.parametrize("where", ["rank", "part"])
def test_a_gap_names_a_few_missing_numbers_and_counts_the_rest(tmp_path, where):
    _shard(tmp_path, 0, 0)
    if where == "rank":
        _shard(tmp_path, 1000, 0)
    else:
        _shard(tmp_path, 0, 1000)
    with pytest.raises(errors.BadCheckpoint) as err:
        open_checkpoint(tmp_path)
    assert f"lacks {where}(s) [1, 2, 3, 4, 5, and 994 more]" in str(err.value)


def test_a_huge_shard_number_is_refused_without_building_its_range(tmp_path):
    """In a child with 1 GiB of address space: a check that built range(10**12) would fail with
    MemoryError (or never end) instead of naming the gap."""
    _shard(tmp_path, 0, 0)
    _shard(tmp_path, 10**12, 0)
    (tmp_path / "p").mkdir()
    _shard(tmp_path / "p", 0, 0)
    _shard(tmp_path / "p", 0, 10**12)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        from hotweights import errors
        from hotweights.format.checkpoint import open_checkpoint
        for d in ({str(tmp_path)!r}, {str(tmp_path / "p")!r}):
            try:
                open_checkpoint(d)
            except errors.BadCheckpoint as e:
                print(e)
        """)
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lacks rank(s) [1, 2, 3, 4, 5, and 999999999994 more]" in out.stdout
    assert "rank 0 lacks part(s) [1, 2, 3, 4, 5, and 999999999994 more]" in out.stdout


@pytest.mark.parametrize(
    "header",
    [
        b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b'{"__metadata__": {"\\udfff": "x"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b'{"__metadata__": {"k": "\\ud800"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    ],
    ids=["tensor-name", "metadata-key", "metadata-value"],
)
def test_text_that_is_not_unicode_is_a_bad_checkpoint(tmp_path, header):
    p = raw_file(tmp_path / "s.safetensors", header, b"\0" * 8)
    with pytest.raises(errors.BadCheckpoint, match="is not valid Unicode text") as err:
        read_header(p)
    str(err.value).encode("utf-8")  # the message itself travels as UTF-8


def test_the_sharded_layout_still_opens(tmp_path):
    for r in (0, 1):
        for part in (0, 1):
            raw_file(tmp_path / f"model-rank-{r}-part-{part}.safetensors", {f"w{part}": F32x2}, b"\0" * 8)
    assert open_checkpoint(tmp_path).world_size == 2


@pytest.mark.parametrize("value", ["prod\n", "v1\n", "a" * 128 + "\n", "a\nb"])
def test_a_name_with_a_newline_is_refused(value):
    from hotweightsd.core.registry import check_name

    with pytest.raises(errors.InvalidArgument, match="invalid alias"):
        check_name("alias", value)
    assert check_name("alias", "a" * 128) == "a" * 128
