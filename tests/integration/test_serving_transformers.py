"""Transformers models whose weights are the daemon's memory.

A real daemon (cpu backend) on a real unix socket; the serving side runs as separate processes
(tests/clients/*.py) that build the model with ``hotweights.transformers.from_hotweights``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support import child_env
from support.daemons import client_json, run_client, short_tmpdir, start_daemon, wait_until
from support.models import llama_config, phi3_config, qwen2_config, save_model, weight_bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One daemon for the module, with the models every test here reads."""
    root = tmp_path_factory.mktemp("serving")
    sock = short_tmpdir()
    d = start_daemon(str(Path(sock) / "hw.sock"))
    models = {
        "llama": save_model(llama_config(), root / "llama"),
        "qwen2": save_model(qwen2_config(), root / "qwen2"),
        "phi3": save_model(phi3_config(), root / "phi3"),
    }
    for name, path in models.items():
        d.cli("load", name, str(path), check=True)
    yield d, models, root
    code = d.stop()
    shutil.rmtree(sock, ignore_errors=True)
    assert code == 0, f"daemon exited with {code}:\n{d.logs()}"


def run_program(name: str, *args: str) -> dict:
    return client_json(name, *args, timeout=180)


def wait_no_leases(d) -> list:
    # Polled in-process: each CLI status is a process of its own, which takes seconds on a loaded machine.
    wait_until(lambda: not d.leases(), what="every lease to end", context=d.leases)
    return d.status()["leases"]


@pytest.mark.parametrize("model", ["llama", "qwen2", "phi3"])  # phi3: fused names of its own, no engine layout
def test_model_from_daemon_memory_equals_from_pretrained(served, model):
    d, models, _ = served
    out = run_program("hf_model.py", d.socket, model, str(models[model]))
    assert out["device"] == "cpu"
    assert out["logits_equal"], out
    assert out["buffers_equal"] and out["param_names_equal"], out
    assert out["outside"] == [], out
    assert out["mapping_modes"] == ["r--s"], out  # shared and read-only: the daemon's pages, not a copy
    if model == "qwen2":
        assert out["lm_head_tied"], out  # tied weights stay one parameter over one attached tensor
    else:
        assert not out["lm_head_tied"], out
    assert out["leases_before_release"] == 1 and out["leases_after_release"] == 0, out
    assert wait_no_leases(d) == []


def test_a_write_into_a_bound_parameter_kills_the_writer_and_leaves_the_weights_as_they_were(served):
    """Attached memory is read-only: an in-place write (an optimizer step, a stray ``add_``) faults in the
    writer's process instead of changing what every other process serving the version reads."""
    d, models, _ = served
    r = run_client("write_bound.py", d.socket, "llama", timeout=180, check=False)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "WROTE" not in r.stdout
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert said, ("the writer died before it bound the model", r.stdout[-2000:], r.stderr[-3000:])
    before = json.loads(said[-1])
    # the dead writer's lease ends with its connection, and the next serving process reads the file's bits
    wait_no_leases(d)
    out = run_program("hf_model.py", d.socket, "llama", str(models["llama"]))
    assert out["logits_equal"], out
    want = load_file(str(models["llama"] / "model.safetensors"))["model.embed_tokens.weight"]
    assert before["sha256"] == hashlib.sha256(want.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_building_the_model_allocates_no_weight_memory(served):
    d, models, _ = served
    weights = weight_bytes(models["llama"])
    assert weights > 50 * 2**20, "the model must be big enough for the RSS measurement to mean something"
    out = run_program("hf_model.py", d.socket, "llama", str(models["llama"]))
    assert out["param_bytes"] == weights, out
    assert out["rss_growth_bytes"] < 0.10 * weights, out
    # the forward pass maps the shared pages in; private memory grows by activations only
    assert out["anon_growth_after_forward_bytes"] < 0.10 * weights, out
    assert out["logits_equal"], out


def _broken_copy(src: Path, dst: Path) -> dict[str, str]:
    """A copy of ``src`` with a tensor missing, one mis-shaped, one mis-typed and one extra; what each is."""
    dst.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, dst / f)
    sd = load_file(str(src / "model.safetensors"))
    broken = {
        "missing": "model.layers.1.mlp.up_proj.weight",
        "shape": "model.layers.0.self_attn.k_proj.weight",
        "dtype": "model.norm.weight",
        "unexpected": "model.layers.0.self_attn.extra.weight",
    }
    del sd[broken["missing"]]
    sd[broken["shape"]] = sd[broken["shape"]][:-32].clone()
    sd[broken["dtype"]] = sd[broken["dtype"]].float()
    sd[broken["unexpected"]] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(sd, str(dst / "model.safetensors"))
    return broken


def test_mismatch_is_one_error_naming_every_offender_and_nothing_stays_leased(served):
    d, models, root = served
    broken = _broken_copy(models["qwen2"], root / "qwen2-broken")
    d.cli("load", "broken", str(root / "qwen2-broken"), check=True)
    try:
        out = run_program("hf_mismatch.py", d.socket, "broken")
    finally:
        d.cli("unload", "broken")
    assert out["raised"] == "BindError" and out["is_invalid_argument"], out
    msg = out["message"]
    for what, name in broken.items():
        assert name in msg, (what, msg)
    assert "4 tensor(s) do not match" in msg, msg
    assert "attached (96, 256), module wants (128, 256)" in msg, msg
    assert "F32" in msg and "torch.bfloat16" in msg, msg  # both sides of the dtype mismatch
    assert out["details"]["missing"] == [broken["missing"]], out
    assert out["details"]["unexpected"] == [broken["unexpected"]], out
    assert out["leases_after_error"] == 0, out
    assert wait_no_leases(d) == []


def test_tp_split_version_is_refused_naming_both_sizes(served, tmp_path):
    d, models, root = served
    shard = subprocess.run(
        [
            sys.executable,
            "-m",
            "hotweights",
            "shard",
            str(models["qwen2"]),
            str(root / "qwen2-tp2"),
            "--tp",
            "2",
            "--no-progress",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert shard.returncode == 0, shard.stderr
    d.cli("load", "tp2", str(root / "qwen2-tp2"), check=True)
    try:
        out = run_program("hf_mismatch.py", d.socket, "tp2")
    finally:
        d.cli("unload", "tp2")
    assert out["raised"] == "BindError", out
    assert "tp=2" in out["message"] and "tp=1" in out["message"], out
    assert out["details"] == {"tp_attached": 2, "tp_wanted": 1}, out
    assert out["leases_after_error"] == 0, out
    assert wait_no_leases(d) == []


def test_missing_config_is_a_clear_error_and_releases(served, tmp_path):
    d, models, root = served
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(models["qwen2"] / "model.safetensors", bare / "model.safetensors")
    d.cli("load", "bare", str(bare), check=True)
    try:
        out = run_program("hf_mismatch.py", d.socket, "bare")
        assert out["raised"] == "InvalidArgument" and "config.json" in out["message"], out
        assert out["leases_after_error"] == 0, out
        # the same files with the config passed by the caller load fine
        ok = run_program("hf_mismatch.py", d.socket, "bare", str(models["qwen2"]))
        assert ok["raised"] is None and ok["leases_after_error"] == 0, ok
    finally:
        d.cli("unload", "bare")


def test_a_version_in_vllms_layout_is_refused_naming_the_layout_and_releases(served):
    d, models, root = served
    d.cli("load", "laid", str(models["qwen2"]), "--layout", "vllm", check=True)
    try:
        out = run_program("hf_mismatch.py", d.socket, "laid")
    finally:
        d.cli("unload", "laid")
    assert out["raised"] == "BindError" and out["is_invalid_argument"], out
    assert "served in layout vllm (loaded with --layout vllm)" in out["message"], out
    assert "without a layout" in out["message"] and out["details"] == {
        "layout": "layout vllm (loaded with --layout vllm)"
    }
    assert out["leases_after_error"] == 0, out
    assert wait_no_leases(d) == []


def test_tensors_from_pretrained_passes_over_are_accepted_and_missing_ones_still_refused(served):
    """Older transformers saved every layer's rotary ``inv_freq``; the model now computes it, and
    ``from_pretrained`` loads such a checkpoint: so does ``from_hotweights``, strict as it is."""
    d, models, root = served
    old = root / "llama-inv-freq"
    old.mkdir()
    shutil.copy(models["llama"] / "config.json", old / "config.json")
    sd = load_file(str(models["llama"] / "model.safetensors"))
    layers = sorted({int(n.split(".")[2]) for n in sd if n.startswith("model.layers.")})
    for i in layers:
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(old / "model.safetensors"), metadata={"format": "pt"})
    d.cli("load", "old", str(old), check=True)
    try:
        out = run_program("hf_mismatch.py", d.socket, "old")
        assert out["raised"] is None and out["leases_after_error"] == 0, out
    finally:
        d.cli("unload", "old")
    # the same checkpoint less a parameter: still one error naming it
    gone = next(n for n in sd if n.endswith("mlp.down_proj.weight"))
    del sd[gone]
    save_file(sd, str(old / "model.safetensors"), metadata={"format": "pt"})
    d.cli("load", "old2", str(old), check=True)
    try:
        out = run_program("hf_mismatch.py", d.socket, "old2")
    finally:
        d.cli("unload", "old2")
    assert out["raised"] == "BindError" and out["details"]["missing"] == [gone], out
    assert out["details"]["unexpected"] == [], out
