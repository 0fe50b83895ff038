"""Input a clumsy or hostile local client sends the daemon through its sockets: refused with a typed
error naming the problem, and the daemon keeps serving everyone else."""

from __future__ import annotations

import pytest

from hotweights import errors
from support.ckpt_tools import raw_file, write_model

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_names_ending_in_a_newline_are_refused(client, tmp_path):
    path = write_model(tmp_path / "m.safetensors")
    with pytest.raises(errors.InvalidArgument, match="invalid model name"):
        client.load("odd\n", path, version="v1")
    with pytest.raises(errors.InvalidArgument, match="invalid version"):
        client.load("m", path, version="v1\n")
    client.load("m", path, version="v1")
    with pytest.raises(errors.InvalidArgument, match="invalid alias"):
        client.set_alias("prod\n", "m@v1", create=True)
    assert [(v.name, v.version) for v in client.list().versions] == [("m", "v1")]


def test_a_tensor_name_that_is_not_unicode_is_a_bad_checkpoint(client, tmp_path):
    p = raw_file(tmp_path / "s.safetensors", b'{"\\ud800": ' + str(F32x2).replace("'", '"').encode() + b"}", b"\0" * 8)
    with pytest.raises(errors.BadCheckpoint, match="is not valid Unicode text"):
        client.load("m", p, version="v1")
    assert list(client.list().versions) == []
