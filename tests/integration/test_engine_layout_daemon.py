"""``hotweights load NAME DIR --layout vllm`` against a real daemon (cpu backend): the daemon serves a
Hugging Face directory in vLLM's parameter layout, the CLI and clients in their own processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.ckpt_tools import write_model
from support.daemons import Daemon, client_json, serve_command, short_tmpdir, start_daemon
from support.models import save_model, tiny_llama_config, tiny_qwen2_config

MODELS = {
    # GQA, untied head, vocabulary 500: both vocabulary tensors padded to 512
    "llama": tiny_llama_config,
    # q/k/v biases, tied embeddings, vocabulary 1000 padded to 1024
    "qwen2": tiny_qwen2_config,
}
HF_ONLY = (
    ".self_attn.q_proj.",
    ".self_attn.k_proj.",
    ".self_attn.v_proj.",
    ".mlp.gate_proj.",
    ".mlp.up_proj.",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    models = {name: save_model(config(), root / name) for name, config in MODELS.items()}
    sock = short_tmpdir()
    d = start_daemon(str(Path(sock) / "hw.sock"))
    yield d, models, root
    code = d.stop()
    shutil.rmtree(sock, ignore_errors=True)
    assert code == 0, f"daemon exited with {code}:\n{d.logs()}"


def _json(d: Daemon, *args: str) -> dict:
    return json.loads(d.cli(*args, "--json", check=True).stdout)


def _versions(d: Daemon, command: str) -> dict[str, dict]:
    return {f"{v['name']}@{v['version']}": v for v in _json(d, command)["versions"]}


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_layout_vllm_serves_vllms_fused_and_padded_tensors(served, model):
    d, models, _ = served
    name = f"{model}-vllm"
    info = _json(d, "load", name, str(models[model]), "--version", "v1", "--layout", "vllm")
    assert info["state"] == "READY" and info["layout"] == "vllm", info
    for command in ("list", "status"):
        assert _versions(d, command)[f"{name}@v1"]["layout"] == "vllm"
    listed = d.cli("list", check=True).stdout
    assert f"{name}@v1" in listed and "layout vllm" in listed, listed
    assert f"{name}@v1 layout vllm" in d.cli("status", check=True).stdout

    out = client_json("attach_vllm_layout.py", d.socket, f"{name}@v1", str(models[model]), timeout=180)
    names = out["names"]
    assert any(n.endswith(".self_attn.qkv_proj.weight") for n in names), names
    assert any(n.endswith(".mlp.gate_up_proj.weight") for n in names), names
    assert [n for n in names if any(part in n for part in HF_ONLY)] == [], names
    if model == "qwen2":
        assert any(n.endswith(".self_attn.qkv_proj.bias") for n in names), names
    assert out["differ"] == [] and out["missing"] == [] and out["extra"] == [], out
    assert out["compared"] >= 10, out
    rows = {"llama": 512, "qwen2": 1024}[model]
    vocab = out["vocab"]
    assert sorted(vocab) == (
        ["lm_head.weight", "model.embed_tokens.weight"] if model == "llama" else ["model.embed_tokens.weight"]
    ), vocab
    for name_, v in vocab.items():
        assert v == {"rows": rows, "padding_zero": True, "rows_equal_file": True}, (name_, v)
    assert out["outside"] == [] and out["mapping_modes"] == ["r--s"], out
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []
    # tensor counts are of the served table: one entry per fused tensor
    ranks = _versions(d, "list")[f"{name}@v1"]["ranks"]
    assert [r["tensors"] for r in ranks] == [len(names)], ranks
    d.cli("unload", name, check=True)


def test_same_files_without_a_layout_are_not_shared_with_the_layout_version(served):
    d, models, _ = served
    hf = str(models["llama"])
    plain = _json(d, "load", "plain", hf, "--version", "v1")
    fused = _json(d, "load", "fused", hf, "--version", "v1", "--layout", "vllm")
    assert plain["layout"] == "" and fused["layout"] == "vllm"
    assert plain["shares_memory_with"] == "" and fused["shares_memory_with"] == ""
    assert "nothing read" not in fused["load_path"], fused
    st = d.status()
    shares = {v["name"]: v["shares_memory_with"] for v in st["versions"]}
    assert shares == {"plain": "", "fused": ""}, shares
    assert st["resident_bytes"] >= plain["bytes"] + fused["bytes"], st
    # each name serves its own table from its own memory
    out = client_json("attach_vllm_layout.py", d.socket, "fused@v1", hf, timeout=180)
    assert out["differ"] == [] and out["missing"] == [] and out["extra"] == [], out
    plain_names = client_json("attach_vllm_layout.py", d.socket, "plain@v1", hf, timeout=180)["names"]
    assert any(".self_attn.q_proj." in n for n in plain_names) and not any("qkv_proj" in n for n in plain_names)
    for n in ("plain", "fused"):
        d.cli("unload", n, check=True)


def test_swap_to_a_path_with_layout_vllm(served):
    d, models, _ = served
    hf = str(models["llama"])
    d.cli("load", "sw", hf, "--version", "v1", "--alias", "sw-prod", check=True)
    info = _json(d, "swap", "sw-prod", hf, "--version", "v2", "--layout", "vllm")
    assert info["name"] == "sw" and info["version"] == "v2" and info["layout"] == "vllm", info
    assert _versions(d, "list")["sw@v2"]["aliases"] == ["sw-prod"]
    out = client_json("attach_vllm_layout.py", d.socket, "sw-prod", hf, timeout=180)
    assert out["differ"] == [] and out["missing"] == [] and out["extra"] == [], out
    # a layout belongs to a checkpoint path: a loaded version keeps its own
    r = d.cli("swap", "sw-prod", "sw@v1", "--layout", "vllm")
    assert r.returncode == 1 and "layout applies to a checkpoint path" in r.stderr, r.stderr
    d.cli("unload", "sw", "--force", check=True)


def test_a_swap_to_a_path_keeps_the_alias_layout_unless_told_and_a_drain_refuses_before_freeing(served):
    d, models, root = served
    hf = str(models["llama"])
    d.cli("load", "kp", hf, "--version", "v1", "--layout", "vllm", "--alias", "kp-prod", check=True)
    # the engine serving kp-prod binds vLLM's layout: a swap that says nothing keeps it
    assert _json(d, "swap", "kp-prod", hf, "--version", "v2")["layout"] == "vllm"
    # a checkpoint the kept layout does not fit: the error says where the layout came from
    bare = write_model(root / "bare-drain" / "model.safetensors", seed=2)
    r = d.cli("swap", "kp-prod", str(bare.parent), "--version", "v9")
    assert r.returncode == 1 and "is the layout of kp@v2, which 'kp-prod' names" in r.stderr, r.stderr
    assert _json(d, "swap", "kp-prod", hf, "--version", "v3", "--layout", "none")["layout"] == ""
    # a drain frees the live version first: a checkpoint the layout refuses must be refused before that
    before = sorted(_versions(d, "list"))
    for layout in ("vllm", "nonsense"):
        r = d.cli("swap", "kp-prod", str(bare.parent), "--version", "v4", "--mode", "drain", "--layout", layout)
        assert r.returncode == 1 and ("config.json" in r.stderr or "unknown layout" in r.stderr), r.stderr
        assert sorted(_versions(d, "list")) == before  # nothing drained
    d.cli("unload", "kp", "--force", check=True)


def test_unknown_layout_and_unfit_checkpoint_are_refused_before_loading(served):
    d, models, root = served
    r = d.cli("load", "bad", str(models["llama"]), "--layout", "nonsense")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "unknown layout 'nonsense'" in r.stderr and "vllm" in r.stderr, r.stderr
    # no config.json beside the files: the layout has nothing to be cut from
    bare = write_model(root / "bare" / "model.safetensors", seed=1)
    r = d.cli("load", "bare", str(bare.parent), "--layout", "vllm")
    assert r.returncode == 1 and "config.json" in r.stderr, r.stderr
    assert [v["name"] for v in d.status()["versions"] if v["name"] in ("bad", "bare")] == []


def test_a_restart_from_the_fd_store_serves_the_layout_again_without_storage(svc, tmp_path):
    hf = save_model(tiny_llama_config(), tmp_path / "llama")
    reference = shutil.copytree(hf, tmp_path / "reference")  # what the client compares with once hf is gone
    sock = str(svc.tmpdir / "hw.sock")
    svc.start(serve_command(sock, config="none"))
    svc.wait_for("READY", "1")
    d = Daemon(sock, svc.process, svc.log_path).wait_ready()
    d.cli("load", "llama", str(hf), "--version", "v1", "--layout", "vllm", check=True)
    svc.stop()
    shutil.rmtree(hf)  # a restart that served it must not have read storage
    svc.start(serve_command(sock, config="none"))
    svc.wait_for("READY", "1")
    d = Daemon(sock, svc.process, svc.log_path).wait_ready()
    st = d.status()
    assert st["restored"] is True, st["restore_note"]
    assert [(v["name"], v["state"], v["layout"]) for v in st["versions"]] == [("llama", "READY", "vllm")]
    out = client_json("attach_vllm_layout.py", sock, "llama@v1", str(reference), timeout=180)
    assert out["differ"] == [] and out["missing"] == [] and out["extra"] == [], out
    assert all(v["padding_zero"] and v["rows"] == 512 for v in out["vocab"].values()), out["vocab"]
    assert svc.stop() == 0


def test_a_restart_without_a_service_manager_reloads_in_the_same_layout(sockdir, tmp_path):
    hf = save_model(tiny_llama_config(), tmp_path / "llama")
    sock = str(sockdir / "plain.sock")
    with start_daemon(sock) as d:
        d.cli("load", "llama", str(hf), "--version", "v1", "--layout", "vllm", check=True)
        assert d.stop() == 0, d.logs()
    d = start_daemon(sock)
    try:
        st = d.wait_status(lambda s: s["versions"] and s["versions"][0]["state"] != "LOADING")
        assert [(v["name"], v["state"], v["layout"]) for v in st["versions"]] == [("llama", "READY", "vllm")]
        assert st["restored"] is False and "reloading 1 version(s) from storage" in st["restore_note"]
        out = client_json("attach_vllm_layout.py", sock, "llama@v1", str(hf), timeout=180)
        assert out["differ"] == [] and out["missing"] == [] and out["extra"] == [], out
    finally:
        assert d.stop() == 0
