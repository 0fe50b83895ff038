"""On the cuda backend: a transformers model whose parameters are the daemon's
GPU memory (CUDA VMM fds), checked against ``from_pretrained`` in a separate process.

Skipped (see conftest.py here) where no GPU or cuda-bindings is present.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support import child_env
from support.daemons import client_json, short_tmpdir, start_daemon
from support.models import llama_config, qwen2_config, save_model, weight_bytes


@pytest.fixture(scope="module")
def gpu_served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # the daemon inherits os.environ
        root = tmp_path_factory.mktemp("serving-gpu")
        sock = short_tmpdir()
        d = start_daemon(str(Path(sock) / "hw.sock"), "--backend", "cuda", "--reserve", "1GiB")
        models = {
            "llama": save_model(llama_config(), root / "llama"),
            "qwen2": save_model(qwen2_config(), root / "qwen2"),
        }
        for name, path in models.items():
            d.cli("load", name, str(path), check=True)
        yield d, models
        code = d.stop()
        shutil.rmtree(sock, ignore_errors=True)
        assert code == 0, d.logs()


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_model_from_daemon_gpu_memory_equals_from_pretrained(gpu_served, model):
    d, models = gpu_served
    out = client_json("hf_model.py", d.socket, model, str(models[model]), "--device", "cuda", timeout=300)
    assert out["device"].startswith("cuda"), out
    assert out["logits_equal"] and out["buffers_equal"] and out["param_names_equal"], out
    assert out["outside"] == [], out  # every parameter inside one of the attachment's mapped regions
    assert out["param_bytes"] == weight_bytes(models[model]), out
    assert out["rss_growth_bytes"] < 0.10 * out["param_bytes"], out  # host memory: no staging copy
    assert out["leases_after_release"] == 0, out
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []
