"""Shards reassembled by the manifest alone equal the source bit for bit.

Tiny random transformers models (Llama with GQA, Llama with tied embeddings and o/down biases,
Qwen2 with q/k/v biases and one KV head, Qwen3 with q/k norms, Mixtral, Qwen2-MoE, Qwen3-MoE) at TP
1, 2 and 4; TP 4 exceeds the KV heads of every one of them, so KV replication is covered.
"""

from __future__ import annotations

import json

import pytest
import torch

from hotweights.format.checkpoint import open_checkpoint
from hotweights.format.manifest import load_manifest, verify_checkpoint
from hotweights.tools.shard import shard_checkpoint
from hotweights.tools.shard.quantize import dequantize_fp8, quantize_fp8
from support.tp_forward import MODELS, build_model, reassemble, shard_cached, source_tensors


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.contiguous().reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_reassembled_shards_equal_the_source(kind, tp):
    src, _ = build_model(kind)
    out = shard_cached(kind, tp)
    assert_bit_equal(reassemble(out), source_tensors(src))
    verify_checkpoint(out, "full")
    ckpt = open_checkpoint(out)
    assert ckpt.layout == "sharded" and ckpt.world_size == tp


def test_kv_heads_replicated_when_fewer_than_tp():
    out = shard_cached("llama_gqa", 4)  # 2 KV heads on 4 ranks
    m = load_manifest(out)
    k = [t for t in m.tensors if t["name"] == "model.layers.0.self_attn.k_proj.weight"]
    assert [(t["rank"], t["split"]["index"], t["split"]["of"]) for t in sorted(k, key=lambda t: t["rank"])] == [
        (0, 0, 2),
        (1, 0, 2),
        (2, 1, 2),
        (3, 1, 2),
    ]
    assert all(t["replicated"] and t["shape"] == [16, 64] for t in k)
    q = [t for t in m.tensors if t["name"] == "model.layers.0.self_attn.q_proj.weight"]
    assert sorted(t["split"]["index"] for t in q) == [0, 1, 2, 3] and all(t["split"]["of"] == 4 for t in q)
    norm = [t for t in m.tensors if t["name"] == "model.norm.weight"]
    assert len(norm) == 4 and all(t["split"] is None and t["replicated"] for t in norm)


def test_manifest_records_layout_and_source():
    src, _ = build_model("mixtral")
    out = shard_cached("mixtral", 2)
    m = load_manifest(out)
    doc = m.doc
    assert doc["tp_size"] == 2 and doc["architecture"] == "MixtralForCausalLM" and doc["format_version"] == 1
    assert doc["source"]["name"] == src.name and doc["source"]["hash"].startswith("xxh64:")
    by = {(t["name"], t["rank"]): t for t in m.tensors}
    assert by[("model.layers.0.block_sparse_moe.experts.3.w2.weight", 1)]["split"] == {"dim": 1, "index": 1, "of": 2}
    assert by[("model.layers.0.block_sparse_moe.experts.3.w1.weight", 0)]["split"] == {"dim": 0, "index": 0, "of": 2}
    assert by[("model.layers.1.block_sparse_moe.gate.weight", 1)]["split"] is None  # router replicated
    assert by[("lm_head.weight", 1)]["split"] == {"dim": 0, "index": 1, "of": 2}
    assert by[("model.embed_tokens.weight", 0)]["split"] == {"dim": 0, "index": 0, "of": 2}
    for name, info in m.files.items():
        assert (out / name).stat().st_size == info["size"]
    assert set(m.aux_files) >= {"config.json", "generation_config.json"}
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_same_source_hash_whatever_the_layout():
    a = load_manifest(shard_cached("qwen2", 1)).doc["source"]["hash"]
    b = load_manifest(shard_cached("qwen2", 4)).doc["source"]["hash"]
    c = load_manifest(shard_cached("llama_gqa", 1)).doc["source"]["hash"]
    assert a == b != c


def test_tied_embeddings_have_no_lm_head():
    out = shard_cached("llama_tied_bias", 2)
    m = load_manifest(out)
    assert m.doc["tied_embeddings"] is True
    assert not any(t["name"] == "lm_head.weight" for t in m.tensors)


def test_indexed_source_with_several_files(tmp_path):
    src, _ = build_model("qwen2_moe", max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("*.safetensors"))) > 1
    out = tmp_path / "out"
    shard_checkpoint(src, out, 2)
    assert_bit_equal(reassemble(out), source_tensors(src))


@pytest.mark.parametrize(
    "options,expected_parts",
    [
        ({"parts_per_rank": 3}, [3, 3]),
        ({"max_part_size": 60_000}, None),
    ],
)
def test_parts(tmp_path, options, expected_parts):
    src, _ = build_model("llama_gqa")
    out = tmp_path / "out"
    shard_checkpoint(src, out, 2, **options)
    m = load_manifest(out)
    per_rank = [sum(1 for f in m.files.values() if f["rank"] == r) for r in range(2)]
    if expected_parts:
        assert per_rank == expected_parts
    else:
        assert min(per_rank) > 1
        largest_tensor = max(t["nbytes"] for t in m.tensors)
        assert all(f["size"] - 8 < 60_000 + largest_tensor for f in m.files.values())
    assert_bit_equal(reassemble(out), source_tensors(src))
    verify_checkpoint(out, "full")


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_shards_reassemble_to_the_unsharded_fp8_checkpoint(granularity):
    one = reassemble(shard_cached("mixtral", 1, dtype="bfloat16", quantize="fp8", fp8_scale=granularity))
    four = reassemble(shard_cached("mixtral", 4, dtype="bfloat16", quantize="fp8", fp8_scale=granularity))
    assert_bit_equal(four, one)
    src, _ = build_model("mixtral", "bfloat16")
    source = source_tensors(src)
    name = "model.layers.0.self_attn.q_proj.weight"
    q, s = quantize_fp8(source[name], granularity)
    assert torch.equal(four[name].view(torch.uint8), q.view(torch.uint8)) and torch.equal(four[name + "_scale"], s)
    # Routers, norms, embeddings and lm_head keep the source precision and bytes.
    for keep in (
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ):
        assert torch.equal(four[keep], source[keep]), keep


def test_fp8_layout_and_config():
    out = shard_cached("qwen2_moe", 2, dtype="bfloat16", quantize="fp8")
    m = load_manifest(out)
    by = {(t["name"], t["rank"]): t for t in m.tensors}
    w = by[("model.layers.0.mlp.experts.1.gate_proj.weight", 1)]
    assert w["dtype"] == "F8_E4M3"
    assert w["quantization"] == {
        "method": "fp8",
        "dtype": "F8_E4M3",
        "granularity": "channel",
        "scale": "model.layers.0.mlp.experts.1.gate_proj.weight_scale",
    }
    s = by[("model.layers.0.mlp.experts.1.gate_proj.weight_scale", 1)]
    assert s["dtype"] == "F32" and s["shape"] == [16, 1] and s["split"] == {"dim": 0, "index": 1, "of": 2}
    down = by[("model.layers.0.mlp.experts.1.down_proj.weight_scale", 1)]
    assert down["shape"] == [64, 1] and down["split"] is None  # row-parallel: every rank needs every row's scale
    assert by[("model.layers.0.self_attn.q_proj.bias", 0)]["dtype"] == "BF16"
    for keep in (
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ):
        assert by[(keep, 0)]["dtype"] == "BF16" and by[(keep, 0)]["quantization"] is None, keep
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == "channel" and weights["num_bits"] == 8 and weights["type"] == "float"
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"} <= set(qc["ignore"])
    assert m.doc["quantization"]["method"] == "fp8"

    per_tensor = shard_cached("qwen2_moe", 2, dtype="bfloat16", quantize="fp8", fp8_scale="tensor")
    qc = json.loads((per_tensor / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic" and "lm_head" in qc["ignored_layers"]
    scale = {(t["name"], t["rank"]): t for t in load_manifest(per_tensor).tensors}[
        ("model.layers.0.self_attn.q_proj.weight_scale", 1)
    ]
    assert scale["shape"] == [] and scale["split"] is None


def test_fp8_rounding_error_is_within_e4m3_precision():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different range
    for granularity in ("channel", "tensor"):
        q, s = quantize_fp8(w, granularity)
        err = (dequantize_fp8(q, s) - w).abs()
        # E4M3 keeps 3 mantissa bits (relative error <= 2^-4); below 2^-6 it is subnormal (step 2^-9).
        bound = torch.maximum(w.abs() * 2**-4, s.expand_as(w) * 2**-10) * (1 + 1e-6)
        assert bool((err <= bound).all()), granularity
    zero_row = torch.zeros(2, 8)
    q, s = quantize_fp8(zero_row, "channel")
    assert torch.equal(dequantize_fp8(q, s), zero_row) and bool((s > 0).all())


def test_memory_stays_bounded_by_the_tensors_in_flight(tmp_path, monkeypatch):
    """With a tiny budget, one source tensor at a time: the whole model is never in memory."""
    from hotweights.tools.shard import sharder

    peak = {"used": 0, "in_flight": 0, "max_in_flight": 0}
    acquire, release = sharder._ByteBudget.acquire, sharder._ByteBudget.release

    def tracked_acquire(self, n):
        acquire(self, n)
        peak["used"] = max(peak["used"], self.used)
        peak["in_flight"] += 1
        peak["max_in_flight"] = max(peak["max_in_flight"], peak["in_flight"])

    def tracked_release(self, n):
        peak["in_flight"] -= 1
        release(self, n)

    monkeypatch.setattr(sharder._ByteBudget, "acquire", tracked_acquire)
    monkeypatch.setattr(sharder._ByteBudget, "release", tracked_release)
    src, _ = build_model("mixtral")
    source = source_tensors(src)
    largest = max(t.numel() * t.element_size() for t in source.values())
    shard_checkpoint(src, tmp_path / "out", 2, workers=4, memory_budget=1)
    assert peak["max_in_flight"] == 1 and peak["used"] <= 2 * largest
    assert_bit_equal(reassemble(tmp_path / "out"), source)

    peak.update(used=0, max_in_flight=0)
    shard_checkpoint(src, tmp_path / "out2", 2, workers=4, memory_budget=8 * largest)
    assert 1 < peak["max_in_flight"] and peak["used"] <= 8 * largest  # parallel, under the budget


def test_fp8_rows_too_small_for_a_float32_scale_dequantize_to_zeros_not_nan():
    for amax in (1e-30, 1e-40, 1e-43, 1e-45):
        row = torch.tensor([[amax, -amax / 2, 0.0, amax / 4]], dtype=torch.float32)
        q, s = quantize_fp8(row, "channel")
        d = dequantize_fp8(q, s)
        assert bool(torch.isfinite(d).all()) and bool((s > 0).all()), (amax, s, d)
        assert float((d - row).abs().max()) <= max(amax, torch.finfo(torch.float32).tiny), amax


@pytest.mark.parametrize(
    "source",
    [
        torch.tensor([[float("inf"), 1.0, 0.0]]),
        torch.tensor([[float("nan"), 1.0, 0.0]]),
        torch.tensor([[1e300, 1.0]], dtype=torch.float64),  # beyond float32
    ],
)
def test_fp8_refuses_non_finite_weights_naming_the_tensor(source):
    from hotweights.errors import InvalidArgument

    for granularity in ("channel", "tensor"):
        with pytest.raises(InvalidArgument, match="model.layers.0.mlp.up_proj.weight"):
            quantize_fp8(source, granularity, "model.layers.0.mlp.up_proj.weight")
