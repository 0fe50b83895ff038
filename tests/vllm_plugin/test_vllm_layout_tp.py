"""A checkpoint in vLLM's layout for tensor parallelism, served by the daemon rank by rank, equals what
vLLM's own weight loaders build for each rank: written offline by ``hotweights.vllm_layout``, or a
``hotweights shard`` checkpoint the daemon lays out itself at load (``--layout vllm``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support import child_env
from support.daemons import client_json, run_cli, short_tmpdir, start_daemon
from support.models import save_model, tiny_llama_config, tiny_qwen2_config

MODELS = {
    # GQA with the vocabulary padded (500 -> 512); at tp=4 each KV head is replicated on two ranks
    "llama": tiny_llama_config,
    # q/k/v biases, tied embeddings
    "qwen2": tiny_qwen2_config,
}


@pytest.fixture(scope="module")
def daemon_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # the daemon inherits os.environ
        sock = short_tmpdir()
        d = start_daemon(str(Path(sock) / "hw.sock"))
        yield d, tmp_path_factory.mktemp("tp")
        code = d.stop()
        shutil.rmtree(sock, ignore_errors=True)
        assert code == 0, d.logs()


@pytest.mark.parametrize(("model", "tp"), [("llama", 2), ("llama", 4), ("qwen2", 2)])
def test_each_rank_equals_vllms_own_loader(daemon_env, model, tp):
    d, root = daemon_env
    hf = save_model(MODELS[model](), root / model) if not (root / model).exists() else root / model
    out_dir = root / f"{model}-vllm-tp{tp}"
    r = run_cli(str(hf), str(out_dir), "--tp", str(tp), module="hotweights.vllm_layout", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    ref = f"{model}-tp{tp}"
    d.cli("load", ref, str(out_dir), check=True)
    ranks = client_json("vllm_tp_layout.py", d.socket, ref, str(hf), str(tp), timeout=300, HF_HUB_OFFLINE="1")
    assert sorted(ranks) == [str(i) for i in range(tp)]
    for rank, rep in ranks.items():
        assert rep["world_size"] == tp, rep
        assert rep["compared"] >= 14, rep
        assert rep["differ"] == [] and rep["missing"] == [] and rep["extra"] == [], (rank, rep)
    d.cli("unload", ref, check=True)


def _shard(hf: Path, out_dir: Path, tp: int) -> Path:
    r = run_cli("shard", str(hf), str(out_dir), "--tp", str(tp), HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    return out_dir


def test_shard_loaded_with_layout_vllm_equals_vllms_own_loader(daemon_env):
    """hotweights shard splits the vocabulary evenly: with a vocabulary that is a multiple of 64 per rank,
    that is vLLM's split, and the daemon fuses q|k|v and gate|up of each rank as it loads."""
    d, root = daemon_env
    hf = save_model(tiny_llama_config(vocab_size=512), root / "llama512")
    sharded = _shard(hf, root / "llama512-tp2", 2)
    d.cli("load", "shard512", str(sharded), "--layout", "vllm", check=True)
    ranks = client_json("vllm_tp_layout.py", d.socket, "shard512", str(hf), "2", timeout=300, HF_HUB_OFFLINE="1")
    assert sorted(ranks) == ["0", "1"]
    for rank, rep in ranks.items():
        assert rep["world_size"] == 2, rep
        assert rep["compared"] >= 14, rep
        assert rep["differ"] == [] and rep["missing"] == [] and rep["extra"] == [], (rank, rep)
    d.cli("unload", "shard512", check=True)


def test_shard_whose_vocabulary_split_is_not_vllms_is_refused_at_load(daemon_env):
    """Vocabulary 500 sharded at tp=2 gives each rank 250 rows; vLLM pads to 512 first and gives 256."""
    d, root = daemon_env
    hf = save_model(tiny_llama_config(), root / "llama500")
    sharded = _shard(hf, root / "llama500-tp2", 2)
    r = d.cli("load", "shard500", str(sharded), "--layout", "vllm")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "model.embed_tokens.weight has 250 rows on rank 0" in r.stderr, r.stderr
    assert "vocabulary of 500 padded to 512" in r.stderr, r.stderr
    assert [v["name"] for v in d.status()["versions"] if v["name"] == "shard500"] == []
