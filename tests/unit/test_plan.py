"""Acceptance 4: ``hotweights plan`` per-GPU weights, free memory and KV capacity.

Golden numbers come from published configs (tests/data/) and published parameter counts:
Llama 3.1 405B has 405,853,388,800 parameters, Llama 3.1 8B 8,030,261,248, Mixtral 8x7B
46,702,792,704, Qwen2.5-0.5B 494,032,768.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotweights.errors import BadCheckpoint, InvalidArgument
from hotweights.tools.capacity import estimate_weight_bytes_per_gpu, plan
from hotweights.tools.shard.model_config import load_config
from hotweights.tools.shard.placement import SourceTensor, plan_shards
from hotweights.tools.shard.rules import resolve_rules
from hotweights.tools.shard.sharder import manifest_doc
from hotweights.tools.shard.writer import layout_parts
from support.tp_forward import MODELS, shard_cached

DATA = Path(__file__).parents[1] / "data"
GB = 10**9


def kv_bytes(layers: int, kv_heads: int, head_dim: int, bytes_per: float) -> float:
    return 2 * layers * kv_heads * head_dim * bytes_per


def test_405b_on_8_h200():
    p = plan(DATA / "llama-3.1-405b", 8, 141 * GB, reserve=5 * GB, kv=["fp16", "fp8", "4", "3"])
    # bf16: the split params of all layers / 8, plus the norms every GPU holds whole.
    assert p.weights_bytes_per_gpu == 101_470_601_216
    assert p.weights_bytes_per_gpu == pytest.approx(405_853_388_800 * 2 / 8, rel=0.001)
    assert p.free_bytes_per_gpu == 141 * GB - 5 * GB - p.weights_bytes_per_gpu
    assert p.kv_heads_per_gpu == 1 and not p.kv_heads_replicated and p.head_dim == 128
    rows = {r.kv: r for r in p.kv_options}
    for label, nbytes in [("fp16", 2), ("fp8", 1), ("4-bit", 0.5), ("3-bit", 0.375)]:
        r = rows[label]
        assert r.kv_bytes_per_token == kv_bytes(126, 1, 128, nbytes)  # 64512 for fp16
        assert r.kv_capacity_tokens == int(p.free_bytes_per_gpu // r.kv_bytes_per_token)
        assert r.sequences_at_max_context == r.kv_capacity_tokens // 131072
    assert rows["fp16"].kv_bytes_per_token == 64512 and rows["fp16"].sequences_at_max_context == 4
    assert rows["fp16"].kv_bytes_per_token_all_gpus == 2 * 126 * 8 * 128 * 2


def synthetic_manifest(tmp_path: Path, model: str, tp: int, quantize: str | None = None) -> Path:
    """A hotweights.json for a model too big to shard here: ``hotweights shard``'s own planner run on
    the tensor names and shapes the model's checkpoint has (no data), laid out in parts."""
    cfg = load_config(DATA / model)
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "lm_head.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    tensors = [SourceTensor(n, "BF16", s) for n, s in shapes.items()]
    sp = plan_shards(tensors, cfg, tp, resolve_rules(cfg), quantize=quantize)
    parts = [p for r in range(tp) for p in layout_parts(sp.rank_outputs(r), r, max_part_bytes=5 * GB)]
    files = {p.name: {"rank": p.rank, "part": p.index, "size": p.size, "xxh64": "0" * 16} for p in parts}
    doc = manifest_doc(sp, parts, files, {}, source={"name": model})
    out = tmp_path / f"{model}-tp{tp}"
    out.mkdir()
    (out / "hotweights.json").write_text(json.dumps(doc))
    (out / "config.json").write_text((DATA / model / "config.json").read_text())
    return out


@pytest.mark.parametrize("quantize,weights", [(None, "bf16"), ("channel", "fp8")])
def test_405b_manifest_bytes_within_2_percent_of_the_estimate(tmp_path, quantize, weights):
    d = synthetic_manifest(tmp_path, "llama-3.1-405b", 8, quantize)
    exact = plan(d, None, 141 * GB, reserve=5 * GB)
    estimate = plan(DATA / "llama-3.1-405b" / "config.json", 8, 141 * GB, reserve=5 * GB, weights=weights)
    assert exact.weights_from == "manifest" and estimate.weights_from == "estimate"
    assert exact.tp == 8 and exact.weights == weights
    assert abs(exact.weights_bytes_per_gpu - estimate.weights_bytes_per_gpu) <= 0.02 * estimate.weights_bytes_per_gpu
    assert exact.kv_options[0].kv_bytes_per_token == estimate.kv_options[0].kv_bytes_per_token == 64512


@pytest.mark.parametrize(
    "model,tp,weights,expected",
    [
        ("llama-3.1-8b", 1, "bf16", 8_030_261_248 * 2),
        ("llama-3.1-8b", 1, "fp32", 8_030_261_248 * 4),
        ("mixtral-8x7b", 1, "bf16", 46_702_792_704 * 2),
        ("qwen2.5-0.5b", 1, "bf16", 494_032_768 * 2),  # tied: one vocabulary table
        # tp 2: everything halves but the norms (and Qwen's q/k/v biases split with their heads).
        ("llama-3.1-8b", 2, "bf16", (8_030_261_248 + (32 * 2 + 1) * 4096) * 2 // 2),
        (
            "mixtral-8x7b",
            8,
            "bf16",
            (46_702_792_704 - (32 * 2 + 1) * 4096 - 32 * 8 * 4096) * 2 // 8 + ((32 * 2 + 1) * 4096 + 32 * 8 * 4096) * 2,
        ),  # norms and routers whole on every GPU
    ],
)
def test_golden_weight_bytes(model, tp, weights, expected):
    assert plan(DATA / model, tp, 80 * GB, weights=weights).weights_bytes_per_gpu == expected


def test_golden_fp8_and_int4_weight_bytes():
    cfg = load_config(DATA / "llama-3.1-8b")
    linear = 8_030_261_248 - 2 * 128256 * 4096 - (32 * 2 + 1) * 4096
    rest = (2 * 128256 * 4096 + (32 * 2 + 1) * 4096) * 2
    out_rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)  # one float32 scale per output row
    assert estimate_weight_bytes_per_gpu(cfg, 1, "fp8") == linear + 4 * out_rows + rest
    assert estimate_weight_bytes_per_gpu(cfg, 1, "int4") == pytest.approx(linear * (0.5 + 2.5 / 128) + rest, abs=1)


def test_kv_heads_replicated_when_fewer_than_tp():
    p = plan(DATA / "llama-3.1-8b", 16, 80 * GB, reserve=0, kv=["bf16"])
    assert p.kv_heads_per_gpu == 1 and p.kv_heads_replicated
    assert p.kv_options[0].kv_bytes_per_token == kv_bytes(32, 1, 128, 2) == 16384
    q = plan(DATA / "qwen2.5-0.5b", 2, 24 * GB, reserve=GB)
    assert q.kv_heads_per_gpu == 1 and not q.kv_heads_replicated
    assert q.kv_options[0].kv_bytes_per_token == kv_bytes(24, 1, 64, 2)
    assert q.max_context == 32768 and q.notes == []  # use_sliding_window false: no sliding window note


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_estimate_equals_a_real_sharded_directory(kind, quantize):
    """The config-only estimate and the real shard agree to the byte on every tiny model."""
    dtype = "bfloat16" if quantize else "float32"
    opts = {"quantize": quantize} if quantize else {}
    d = shard_cached(kind, 2, dtype=dtype, **opts)
    p = plan(d, None, 10**9, reserve=0)
    assert p.weights_from == "manifest"
    assert p.weights_bytes_per_gpu == p.weights_bytes_per_gpu_estimate
    assert p.weights == ("fp8" if quantize else "fp32" if dtype == "float32" else "bf16")


def test_from_a_config_file_and_from_a_directory_agree():
    a = plan(DATA / "mixtral-8x7b" / "config.json", 2, 141 * GB, reserve=5 * GB)
    b = plan(DATA / "mixtral-8x7b", 2, 141 * GB, reserve=5 * GB)
    assert a.to_json() | {"model": ""} == b.to_json() | {"model": ""}


def test_json_fields():
    doc = plan(DATA / "llama-3.1-405b", 8, 141 * GB, reserve=5 * GB, kv=["fp8", "3"]).to_json()
    for key in (
        "weights_bytes_per_gpu",
        "free_bytes_per_gpu",
        "kv_bytes_per_token",
        "kv_capacity_tokens",
        "kv_heads_per_gpu",
        "kv_heads_replicated",
        "kv_options",
    ):
        assert key in doc, key
    assert doc["kv"] == "fp8" and doc["kv_bytes_per_token"] == 32256  # the first option asked for
    assert [r["kv"] for r in doc["kv_options"]] == ["fp8", "3-bit"]
    assert doc["kv_capacity_tokens"] == doc["free_bytes_per_gpu"] // 32256
    json.dumps(doc)


def test_weights_that_do_not_fit():
    p = plan(DATA / "llama-3.1-405b", 4, 141 * GB, reserve=5 * GB)
    assert not p.fits and p.free_bytes_per_gpu < 0
    assert all(r.kv_capacity_tokens == 0 for r in p.kv_options)
    assert p.notes[0].startswith("does not fit") and "at tp 8 the bf16 weights fit" in p.notes[0]


@pytest.mark.parametrize(
    "args,error,match",
    [
        (dict(tp=3), InvalidArgument, "does not divide num_attention_heads"),
        (dict(tp=8, kv=["fp7"]), InvalidArgument, "unknown KV option 'fp7'"),
        (dict(tp=8, weights="int2"), InvalidArgument, "--weights must be one of"),
        (dict(tp=None), InvalidArgument, "--tp is required"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        plan(DATA / "llama-3.1-405b", args.pop("tp"), 141 * GB, **args)


def test_manifest_tp_mismatch(tmp_path):
    d = shard_cached("llama_gqa", 2)
    with pytest.raises(InvalidArgument, match="sharded for tp 2, not 4"):
        plan(d, 4, GB)


def test_config_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(BadCheckpoint, match="missing num_hidden_layers, num_attention_heads, vocab_size"):
        plan(tmp_path, 1, GB)
    with pytest.raises(BadCheckpoint, match=r"no config\.json"):
        empty = tmp_path / "empty"
        empty.mkdir()
        plan(empty, 1, GB)


def test_weights_option_on_a_sharded_directory_is_noted_not_misreported():
    d = shard_cached("llama_gqa", 2)
    p = plan(d, None, GB, weights="fp8")
    assert p.weights == "fp32" and p.weights_bytes_per_gpu == p.weights_bytes_per_gpu_estimate
    assert "--weights fp8 ignored" in p.notes[0]
