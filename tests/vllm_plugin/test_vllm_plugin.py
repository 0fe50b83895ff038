"""vLLM (CPU build) serves the daemon's weights through `load_format="hotweights"`.

A real daemon (cpu backend) on a real unix socket; each engine runs in its own process
(tests/clients/vllm_generate.py) and is compared with vLLM's own loader on the same files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from support import CLIENTS, child_env
from support.daemons import run_cli, short_tmpdir, start_daemon
from support.models import save_model, tiny_llama_config, tiny_mixtral_config


def tiny_llama(directory: Path) -> Path:
    return save_model(tiny_llama_config(max_position_embeddings=256), directory)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # the daemon inherits os.environ
        root = tmp_path_factory.mktemp("vllm")
        hf = tiny_llama(root / "llama")
        for tp in (1, 2):
            out = str(root / f"llama-vllm-tp{tp}")
            r = run_cli(str(hf), out, "--tp", str(tp), module="hotweights.vllm_layout", HF_HUB_OFFLINE="1")
            assert r.returncode == 0, r.stderr
        sock = short_tmpdir()
        d = start_daemon(str(Path(sock) / "hw.sock"))
        d.cli("load", "hf", str(hf), check=True)
        d.cli("load", "vl", str(root / "llama-vllm-tp1"), check=True)
        d.cli("load", "vl2", str(root / "llama-vllm-tp2"), check=True)
        # the Hugging Face files again, served in vLLM's layout by the daemon itself: no offline conversion
        d.cli("load", "hfv", str(hf), "--layout", "vllm", check=True)
        yield d, hf
        code = d.stop()
        shutil.rmtree(sock, ignore_errors=True)
        assert code == 0, d.logs()


def engine(model_dir: Path, *args: str, ok: bool = True) -> dict | subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(CLIENTS / "vllm_generate.py"), str(model_dir), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(HF_HUB_OFFLINE="1"),
    )
    if not ok:
        return r
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"engine failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(lines[-1])


# The tiny random models' logits lie within a few bf16 steps of each other (their two best tokens are
# often one step apart), and vLLM's CPU kernels do not give the same last bit on every run of the same
# weights: a greedy token may flip there. A loader's mistake moves logprobs by far more than this, and every
# such check stands beside one of the weights themselves, bit for bit.
NEAR_TIE = 0.03  # nats: a few bf16 steps of these logits


def assert_same_greedy(out: dict, reference: dict, what: str = "") -> None:
    """The same greedy tokens; or the same, with the same logprobs (within NEAR_TIE), up to a step where
    both runs had the two tokens within NEAR_TIE of each other. What follows such a step is not compared."""
    if out["tokens"] == reference["tokens"]:
        return
    for p, (mine, theirs) in enumerate(zip(out["tokens"], reference["tokens"], strict=True)):
        step = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), None)
        if step is None:
            continue
        where = f"{what}: prompt {p} parts at step {step} ({mine} against {theirs})"
        for i in range(step + 1):
            ours, ref = out["logprobs"][p][i], reference["logprobs"][p][i]
            moved = {t: (ours[t], ref[t]) for t in ours.keys() & ref.keys() if abs(ours[t] - ref[t]) > NEAR_TIE}
            assert not moved, f"{where}; at step {i} the logprobs differ: {moved}"
        a, b = str(mine[step]), str(theirs[step])
        for run in (out, reference):
            top = run["logprobs"][p][step]
            assert a in top and b in top and abs(top[a] - top[b]) <= NEAR_TIE, f"{where}, not at a near-tie: {top}"


def test_tokens_may_part_only_at_a_near_tie_of_both_runs():
    """The comparison itself: a flip between tokens one bf16 step apart passes; one between tokens far
    apart, or after logprobs that moved, does not."""

    def run(tokens: list[int], steps: list[dict[int, float]]) -> dict:
        return {"tokens": [tokens], "logprobs": [[{str(t): lp for t, lp in s.items()} for s in steps]]}

    ref = run([5, 7, 9], [{5: -1.0, 6: -1.5}, {7: -2.0, 8: -2.004}, {9: -1.0, 3: -1.2}])
    assert_same_greedy(run([5, 8, 3], [{5: -1.0, 6: -1.5}, {8: -2.0, 7: -2.004}, {3: -1.0}]), ref)
    with pytest.raises(AssertionError, match="not at a near-tie"):
        assert_same_greedy(run([6, 7, 9], [{5: -1.0, 6: -1.5}, {7: -2.0}, {9: -1.0}]), ref)
    with pytest.raises(AssertionError, match="at step 0 the logprobs differ"):
        assert_same_greedy(run([5, 8, 3], [{5: -0.5, 6: -1.5}, {8: -2.0, 7: -2.004}, {3: -1.0}]), ref)


def hotweights_args(d, model: str, **extra) -> list[str]:
    return ["--load-format", "hotweights", "--extra", json.dumps({"model": model, "socket": d.socket, **extra})]


@pytest.fixture(scope="module")
def reference(served):
    _, hf = served
    return engine(hf)


def test_zero_copy_engine_equals_vllms_own_loader(served, reference):
    d, hf = served
    out = engine(hf, *hotweights_args(d, "vl"))
    assert_same_greedy(out, reference)
    assert out["checksums"] == reference["checksums"]
    # the fused tensors (qkv_proj, gate_up_proj, padded vocabulary) as vLLM's loader built them
    assert out["before_postprocessing"] == reference["before_postprocessing"]
    assert len(out["before_postprocessing"]) == 15
    p = out["params"]
    assert p["holds_attachment"], p
    assert p["own"] == [] and len(p["aliased"]) == 7, p  # every parameter vLLM keeps aliases the daemon's mapping
    assert sorted(out["aliased_before_postprocessing"]) == sorted(out["before_postprocessing"]), out
    assert out["external_weight_memory"] > 0  # outside vLLM's budget: the daemon holds it
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_a_checkpoint_written_by_vllms_sharded_state_saver_is_bound_as_it_is(served, reference, tmp_path):
    """vLLM's own ``save_sharded_state`` format (``model-rank-R-part-P`` files in vLLM's parameter names,
    written by its ShardedStateLoader) loads without a layout and binds zero copy."""
    d, hf = served
    saved = tmp_path / "saved"
    saved.mkdir()  # vLLM's saver writes into an existing directory
    written = engine(hf, "--save-sharded", str(saved))
    assert_same_greedy(written, reference)
    assert sorted(p.name for p in saved.iterdir()) == ["model-rank-0-part-0.safetensors"]
    d.cli("load", "saved", str(saved), check=True)
    try:
        out = engine(hf, *hotweights_args(d, "saved"))
        assert_same_greedy(out, reference)
        assert out["checksums"] == reference["checksums"]
        assert out["before_postprocessing"] == reference["before_postprocessing"]
        assert sorted(out["aliased_before_postprocessing"]) == sorted(out["before_postprocessing"]), out
        assert out["params"]["holds_attachment"], out["params"]
        # no layout and no converter's marker, yet bound zero copy: the memory report says so too
        assert out["external_weight_memory"] > 0, out
    finally:
        d.cli("unload", "saved", "--force")
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_an_engine_core_in_its_own_process_registers_the_loader_and_holds_the_lease(served, reference):
    """As ``vllm serve`` runs it: the engine core in a process of its own, where only the entry point
    registers the loader; the lease is that process's while it lives and ends with it."""
    d, hf = served
    out = engine(hf, "--processes", *hotweights_args(d, "vl"))
    assert_same_greedy(out, reference)
    assert out["checksums"] == reference["checksums"]
    held = [x for x in out["leases"] if x["holder"].startswith("vllm:")]
    assert len(held) == 1, out["leases"]
    assert held[0]["ref"].startswith("vl@") and held[0]["pid"] != out["pid"], (held, out["pid"])
    assert held[0]["holder"] == f"vllm:{held[0]['pid']}:tp0"
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_zero_copy_of_a_version_loaded_with_layout_vllm_equals_vllms_own_loader(served, reference):
    d, hf = served
    assert [v["layout"] for v in d.status()["versions"] if v["name"] == "hfv"] == ["vllm"]
    out = engine(hf, *hotweights_args(d, "hfv"))
    assert_same_greedy(out, reference)
    assert out["checksums"] == reference["checksums"]
    assert out["before_postprocessing"] == reference["before_postprocessing"]
    assert len(out["before_postprocessing"]) == 15
    # every parameter as the loader left it aliases the mapping, the fused ones the daemon built included
    assert sorted(out["aliased_before_postprocessing"]) == sorted(out["before_postprocessing"]), out
    p = out["params"]
    assert p["holds_attachment"], p
    assert p["own"] == [] and len(p["aliased"]) == 7, p
    hfv = next(v for v in d.status()["versions"] if v["name"] == "hfv")
    rank = hfv["ranks"][0]
    # what the rank holds resident (its vocabulary padding and allocation rounding too), not what was read
    assert out["external_weight_memory"] == int(rank["resident_bytes"]) > int(rank["bytes"]), (out, rank)
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


@pytest.mark.parametrize("model", ["hf", "vl", "hfv"])
def test_copy_mode_equals_vllms_own_loader(served, reference, model):
    """The Hugging Face layout in the default mode (auto chooses copy, and says the engine holds the
    memory); vLLM's layout, converted offline or built by the daemon at load, with copy asked for."""
    d, hf = served
    out = engine(hf, *hotweights_args(d, model, **({} if model == "hf" else {"mode": "copy"})))
    assert_same_greedy(out, reference)
    assert out["checksums"] == reference["checksums"]
    assert out["before_postprocessing"] == reference["before_postprocessing"]
    p = out["params"]
    assert p["aliased"] == [] and not p["holds_attachment"], p  # engine-owned memory, lease given back
    assert out["external_weight_memory"] == 0


def test_a_mixtral_loaded_with_layout_vllm_binds_its_stacked_experts_without_a_copy(served, tmp_path):
    """The experts of each layer stacked per expert (w13, w2) by the daemon, bound to vLLM's fused MoE
    layer; and the same files in the Hugging Face layout copied by the default mode."""
    d, _ = served
    moe = save_model(tiny_mixtral_config(max_position_embeddings=256), tmp_path / "mixtral")
    d.cli("load", "moe", str(moe), "--layout", "vllm", check=True)
    d.cli("load", "moe-hf", str(moe), check=True)
    try:
        reference = engine(moe)
        out = engine(moe, *hotweights_args(d, "moe"))
        assert_same_greedy(out, reference)
        assert out["checksums"] == reference["checksums"]
        assert out["before_postprocessing"] == reference["before_postprocessing"]
        # every parameter bound to the daemon's memory as the loader left it, the stacked experts too
        assert sorted(out["aliased_before_postprocessing"]) == sorted(out["before_postprocessing"]), out
        experts = [n for n in out["aliased_before_postprocessing"] if ".experts." in n]
        assert len(experts) == 4 and all(n.endswith(("w13_weight", "w2_weight")) for n in experts), experts
        # vLLM's CPU MoE kernels then take copies of the experts in their own layout (as its CPU linear
        # kernels repack the linear weights); everything else stays the daemon's memory
        p = out["params"]
        assert p["holds_attachment"] and sorted(p["own"]) == sorted(experts), p
        copied = engine(moe, *hotweights_args(d, "moe-hf"))
        assert_same_greedy(copied, reference)
        assert copied["checksums"] == reference["checksums"]
        assert copied["params"]["aliased"] == [] and copied["external_weight_memory"] == 0
    finally:
        d.cli("unload", "moe", "--force")
        d.cli("unload", "moe-hf", "--force")
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_an_fp8_checkpoint_is_copied_into_the_engine_from_either_layout(served, tmp_path):
    """FP8 weights with one scale per output channel (hotweights shard --quantize fp8): the daemon fuses
    the scales with their rows under --layout vllm, the plugin copies (vLLM post-processes quantized
    weights in place) and the engine equals vLLM's own loader on the same files; zero copy is refused."""
    from hotweights.tools.shard.sharder import shard_checkpoint

    d, _ = served
    fp8 = tmp_path / "llama-fp8"
    hf = tiny_llama(tmp_path / "llama")
    shard_checkpoint(hf, fp8, 1, quantize="fp8", fp8_scale="channel")
    d.cli("load", "fp8v", str(fp8), "--layout", "vllm", check=True)
    d.cli("load", "fp8", str(fp8), check=True)
    try:
        reference = engine(fp8)
        assert any(n.endswith("qkv_proj.weight_scale") for n in reference["before_postprocessing"])
        for model in ("fp8v", "fp8"):
            out = engine(fp8, *hotweights_args(d, model))
            # the loader's claim is the weights, bit for bit, before and after vLLM's post-processing
            assert out["before_postprocessing"] == reference["before_postprocessing"], model
            assert out["checksums"] == reference["checksums"], model
            assert_same_greedy(out, reference, model)
            assert out["params"]["aliased"] == [] and not out["params"]["holds_attachment"], model
            assert out["external_weight_memory"] == 0, model
        r = engine(fp8, *hotweights_args(d, "fp8v", mode="zero_copy"), ok=False)
        assert r.returncode != 0 and "quantized (compressed-tensors)" in r.stderr, r.stderr[-3000:]
        # an unquantized engine given the FP8 version: one line naming both sides, no per-tensor list
        r = engine(hf, *hotweights_args(d, "fp8"), ok=False)
        assert r.returncode != 0, r.stdout[-3000:]
        assert (
            "quantization: checkpoint quantized (compressed-tensors, float-quantized, channel), engine unquantized"
            in r.stderr
        ), r.stderr[-3000:]
        assert "shape or dtype differs" not in r.stderr, r.stderr[-3000:]
    finally:
        d.cli("unload", "fp8v", "--force")
        d.cli("unload", "fp8", "--force")
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_unknown_option_wrong_tp_and_zero_copy_of_hf_layout_are_clear_errors(served):
    d, hf = served
    r = engine(hf, *hotweights_args(d, "vl", sockett="/x"), ok=False)
    assert r.returncode != 0 and "unknown model_loader_extra_config key(s) ['sockett']" in r.stderr, r.stderr[-3000:]
    r = engine(hf, *hotweights_args(d, "vl2"), ok=False)
    assert r.returncode != 0 and "tp=2" in r.stderr and "tensor_parallel_size=1" in r.stderr, r.stderr[-3000:]
    r = engine(hf, *hotweights_args(d, "hf", mode="zero_copy"), ok=False)
    assert r.returncode != 0 and "python -m hotweights.vllm_layout" in r.stderr, r.stderr[-3000:]
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_zero_copy_of_experts_only_where_vllms_moe_kernels_leave_them_as_they_are(monkeypatch):
    """Blackwell's default fused-MoE kernels (and ROCm's) rewrite the experts in place after loading:
    the daemon's read-only memory cannot be them, so auto copies there and zero_copy refuses."""
    import torch

    import hotweights.vllm as plugin

    moe, dense = {"num_local_experts": 8}, {}
    assert not plugin._experts_rewritten(moe, torch.device("cpu"))  # the CPU kernels take copies
    for major, rewritten in ((8, False), (9, False), (10, True), (12, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        assert plugin._experts_rewritten(moe, torch.device("cuda:0")) is rewritten, major
        assert not plugin._experts_rewritten(dense, torch.device("cuda:0"))
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    assert plugin._experts_rewritten(moe, torch.device("cuda:0"))


def test_a_zero_copy_bind_error_names_the_version_and_rank_and_the_saved_dtype():
    """The plugin binds the attached tensors under the model's names: its errors still name what they came from."""
    import torch

    import hotweights.vllm as plugin
    from hotweights.errors import BindError
    from hotweights.torch import bind

    att = SimpleNamespace(
        key="llama@abc123",
        rank=1,
        meta={"0.weight": SimpleNamespace(dtype="BF16")},
    )
    tensors = {"0.weight": torch.zeros(3, 4, dtype=torch.bfloat16)}
    with pytest.raises(BindError) as caught:
        model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
        bind(model, plugin._Renamed(tensors, att, plugin._layout_names(model)))
    assert str(caught.value).startswith("cannot bind Sequential to llama@abc123 rank 1:"), caught.value
    assert "0.weight: attached (3, 4), module wants (2, 4)" in str(caught.value)
    tensors = {"0.weight": torch.zeros(2, 4, dtype=torch.bfloat16)}
    with pytest.raises(BindError) as caught:
        model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
        bind(model, plugin._Renamed(tensors, att, plugin._layout_names(model)))
    assert "0.weight: attached BF16 (torch.bfloat16), module wants torch.float32" in str(caught.value)


def test_a_reload_that_fails_closes_its_client(monkeypatch):
    import hotweights
    import hotweights.vllm as plugin
    from hotweights.errors import NotFound

    closed: list[bool] = []

    class Client:
        def list(self):  # the loader lists the versions first, to know which rank to attach
            return SimpleNamespace(aliases=[], versions=[])

        def attach(self, *a, **k):
            raise NotFound("no model 'gone'")

        def close(self):
            closed.append(True)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(hotweights, "connect", lambda socket=None: Client())
    monkeypatch.setattr(plugin, "_tp", lambda: (0, 1))
    loader = plugin.HotweightsModelLoader(
        SimpleNamespace(model_loader_extra_config={"model": "gone"}, device=None, load_format="hotweights")
    )
    with pytest.raises(NotFound):
        loader.load_weights(None, None)
    assert closed == [True]
