"""``hotweights plan``: per-GPU weights, free memory and KV capacity.

Golden numbers come from published configs (tests/data/) and published parameter counts:
Llama 3.1 405B has 405,853,388,800 parameters, Llama 3.1 8B 8,030,261,248, Mixtral 8x7B
46,702,792,704, Qwen2.5-0.5B 494,032,768; DeepSeek-V3 and gpt-oss-120b below.
"""

from __future__ import annotations

import json
import math
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


# ---- multi-head latent attention, packed weights, sliding windows ---------------------------------
#
# DeepSeek-V3 (tests/data/deepseek-v3/config.json, as published with the model): 671,026,404,352
# parameters without its multi-token-prediction layer (the 671B of the model card; transformers'
# DeepseekV3ForCausalLM built from this config on the meta device counts the same).
# gpt-oss-120b (tests/data/gpt-oss-120b/config.json, as published): 116,829,156,672 parameters (the
# model card's 116.83B). Its tensors (MXFP4 experts: uint8 blocks of two weights and a uint8 scale
# per 32; everything else bf16) add up to 65,248,815,744 bytes; the published safetensors are listed
# at about 65.2 GB (60.8 GiB).
GPT_OSS_CHECKPOINT_BYTES = 65_248_815_744
GPT_OSS_PUBLISHED_GIB = 60.8


def deepseek_v3_params_per_gpu(tp: int) -> int:
    """Parameters on one GPU, written out from the tensor shapes of the checkpoint."""
    h, heads = 7168, 128 // tp
    attn = (
        1536 * h
        + 1536  # q_a_proj and q_a_layernorm: replicated
        + heads * (128 + 64) * 1536  # q_b_proj: nope + rope dims per head
        + (512 + 64) * h
        + 512  # kv_a_proj_with_mqa and kv_a_layernorm: replicated
        + heads * (128 + 128) * 512  # kv_b_proj: nope + v dims per head
        + h * heads * 128  # o_proj
        + 2 * h  # input and post-attention norms
    )
    dense = 3 * h * (18432 // tp)
    expert = 3 * h * (2048 // tp)
    moe = 256 * expert + 256 * h + expert  # 256 routed experts, the router, one shared expert
    return 2 * (129280 // tp) * h + h + 61 * attn + 3 * dense + 58 * moe


def test_deepseek_v3_latent_kv_cached_whole_on_every_gpu():
    p = plan(DATA / "deepseek-v3", 8, 141 * GB, reserve=5 * GB, kv=["bf16", "fp8"])
    assert p.attention == "mla" and p.head_dim == 512 + 64 and p.kv_heads_replicated
    bf16, fp8 = p.kv_options
    assert bf16.kv_bytes_per_token == 61 * 576 * 2 == 70_272
    assert bf16.kv_bytes_per_token_all_gpus == 8 * 70_272  # the latent is not split by heads
    assert fp8.kv_bytes_per_token == 35_136
    assert bf16.kv_capacity_tokens == p.free_bytes_per_gpu // 70_272
    assert bf16.sequences_at_max_context == bf16.kv_capacity_tokens // 163840
    assert any("multi-token-prediction" in n for n in p.notes)


def test_deepseek_v3_weights():
    assert deepseek_v3_params_per_gpu(1) == 671_026_404_352
    e_score_bias = 58 * 256 * 4  # float32, one per routed expert of each MoE layer
    for tp in (1, 8):
        bf16 = plan(DATA / "deepseek-v3", tp, 141 * GB, weights="bf16")
        assert bf16.weights_bytes_per_gpu == deepseek_v3_params_per_gpu(tp) * 2 + e_score_bias
    total = plan(DATA / "deepseek-v3", 1, 2000 * GB, weights="bf16").weights_bytes_per_gpu
    assert total == pytest.approx(671e9 * 2, rel=0.02)
    # The config's own FP8 (128x128 blocks with a float32 scale each; embeddings, norms, routers bf16).
    fp8 = plan(DATA / "deepseek-v3", 1, 2000 * GB)
    assert fp8.weights == "fp8" and fp8.weights_bytes_per_gpu == pytest.approx(671e9, rel=0.02)
    per_gpu = plan(DATA / "deepseek-v3", 8, 141 * GB).weights_bytes_per_gpu
    assert per_gpu == pytest.approx(671e9 / 8, rel=0.02)  # q_a/kv_a replicated: +1.5%
    assert fp8.weights_bytes_per_gpu / 8 < per_gpu


def gpt_oss_bytes(tp: int, experts_format: str) -> float:
    h, inter, e, layers = 2880, 2880 // tp, 128, 36
    expert_weights = e * (2 * inter * h + h * inter)
    if experts_format == "mxfp4":  # 4 bits and one 8-bit scale per 32 weights of a row
        experts = e * (2 * inter * h + h * inter) / 2 + e * (2 * inter * (h // 32) + h * math.ceil(inter / 32))
    else:
        experts = expert_weights * 2
    q, kv = 64 // tp * 64, 8 // tp * 64
    attn = (q + 2 * kv) * h + h * q + (q + 2 * kv) + h + 64 // tp  # weights, q/k/v and o biases, sinks
    rest = attn + 2 * h + e * h + e + e * (2 * inter + h)  # norms, router and its bias, expert biases
    return layers * (experts + rest * 2) + (2 * (201088 // tp) * h + h) * 2


def test_gpt_oss_120b_mxfp4_weights():
    p = plan(DATA / "gpt-oss-120b", 1, 141 * GB, reserve=5 * GB)
    assert p.weights == "mxfp4" and p.fits
    assert p.weights_bytes_per_gpu == gpt_oss_bytes(1, "mxfp4") == GPT_OSS_CHECKPOINT_BYTES
    assert p.weights_bytes_per_gpu == pytest.approx(GPT_OSS_PUBLISHED_GIB * 2**30, rel=0.05)
    tp8 = plan(DATA / "gpt-oss-120b", 8, 141 * GB, reserve=5 * GB)
    assert tp8.weights_bytes_per_gpu == math.ceil(gpt_oss_bytes(8, "mxfp4"))
    assert tp8.weights_bytes_per_gpu == pytest.approx(8.2e9, rel=0.01)
    bf16 = plan(DATA / "gpt-oss-120b", 8, 141 * GB, reserve=5 * GB, weights="bf16")
    assert bf16.weights_bytes_per_gpu == gpt_oss_bytes(8, "bf16")
    assert bf16.weights_bytes_per_gpu / tp8.weights_bytes_per_gpu > 3.5  # what counting MXFP4 as bf16 cost


def test_gpt_oss_alternating_sliding_window_kv():
    p = plan(DATA / "gpt-oss-120b", 8, 141 * GB, reserve=5 * GB, kv=["bf16"])
    assert p.sliding_window == 128 and p.sliding_window_layers == 18 and p.max_context == 131072
    r = p.kv_options[0]
    per_layer = 2 * 1 * 64 * 2  # K and V, one KV head per GPU, head_dim 64, 2 bytes
    assert r.kv_bytes_per_token == 36 * per_layer == 9216
    assert r.kv_bytes_per_token_past_window == 18 * per_layer
    assert r.kv_bytes_per_sequence == 18 * per_layer * 131072 + 18 * per_layer * 128
    assert r.sequences_at_max_context == p.free_bytes_per_gpu // r.kv_bytes_per_sequence
    assert r.kv_capacity_tokens == p.free_bytes_per_gpu * 131072 // r.kv_bytes_per_sequence
    # nearly twice the tokens the same memory holds with every layer at full context
    assert r.kv_capacity_tokens > 1.99 * (p.free_bytes_per_gpu // r.kv_bytes_per_token)


def test_sliding_window_on_every_layer(tmp_path):
    cfg = json.loads((DATA / "llama-3.1-8b" / "config.json").read_text())
    cfg |= {"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = plan(tmp_path, 1, 80 * GB, kv=["bf16"])
    r = p.kv_options[0]
    assert p.sliding_window_layers == 32 and r.kv_bytes_per_token_past_window == 0
    assert r.kv_bytes_per_sequence == r.kv_bytes_per_token * 4096
    full = plan(tmp_path, 1, 80 * GB, kv=["bf16"], max_context=2048).kv_options[0]
    assert full.kv_bytes_per_sequence == full.kv_bytes_per_token * 2048  # shorter than the window


def test_packed_formats_count_their_scales():
    cfg = load_config(DATA / "llama-3.1-8b")
    linear = 8_030_261_248 - 2 * 128256 * 4096 - (32 * 2 + 1) * 4096
    rest = (2 * 128256 * 4096 + (32 * 2 + 1) * 4096) * 2
    assert estimate_weight_bytes_per_gpu(cfg, 1, "mxfp4") == linear * (1 / 2 + 1 / 32) + rest
    nvfp4_globals = 32 * 7 * 8  # two float32 scalars per linear weight, seven linear weights a layer
    assert estimate_weight_bytes_per_gpu(cfg, 1, "nvfp4") == linear * (1 / 2 + 1 / 16) + rest + nvfp4_globals


@pytest.mark.parametrize(
    "quantization,expected",
    [
        ({"quant_method": "mxfp4"}, "mxfp4"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "nvfp4"),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, "fp8"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "group_size": 16}}},
            },
            "nvfp4",
        ),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4}}}}, "int4"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8"),
        ({"quant_method": "awq"}, "int4"),
        (None, "bf16"),
    ],
)
def test_the_weight_format_a_config_names(tmp_path, quantization, expected):
    cfg = json.loads((DATA / "llama-3.1-8b" / "config.json").read_text())
    if quantization is not None:
        cfg["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert plan(tmp_path, 1, 80 * GB).weights == expected


def test_excluded_modules_stay_in_the_source_precision(tmp_path):
    """gpt-oss's own list keeps attention in bf16: without it in the list, attention is packed too."""
    cfg = json.loads((DATA / "gpt-oss-120b" / "config.json").read_text())
    native = plan(DATA / "gpt-oss-120b", 1, 141 * GB).weights_bytes_per_gpu
    cfg["quantization_config"]["modules_to_not_convert"] = ["model.layers.*.mlp.router", "model.embed_tokens"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    attn = 36 * (4096 + 2 * 512 + 4096) * 2880  # q/k/v and o weights of every layer
    packed_attn = plan(tmp_path, 1, 141 * GB).weights_bytes_per_gpu
    assert native - packed_attn == attn * (2 - (1 / 2 + 1 / 32))  # bf16 -> MXFP4 with its scales


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    import typer

    from hotweights.cli import offline

    app = typer.Typer()
    offline.register(app)
    return app


def plan_cli(cli, *args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(cli, ["plan", *map(str, args)])


def test_cli_exits_nonzero_when_the_model_does_not_fit(cli):
    r = plan_cli(cli, DATA / "llama-3.1-405b", "--tp", 4, "--gpu-memory", "141GB")
    assert r.exit_code == 1
    assert "does not fit" in r.stderr and "at tp 8 the bf16 weights fit" in r.stderr
    assert "DOES NOT FIT" in r.stdout
    r = plan_cli(cli, DATA / "llama-3.1-405b", "--tp", 4, "--gpu-memory", "141GB", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["fits"] is False
    r = plan_cli(cli, DATA / "llama-3.1-405b", "--tp", 8, "--gpu-memory", "141GB", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["fits"] is True


@pytest.mark.parametrize("option,value", [("--gpu-memory", "141"), ("--reserve", "5")])
def test_cli_refuses_sizes_without_a_unit(cli, option, value):
    args = {"--gpu-memory": "141GB", "--reserve": "5GB"} | {option: value}
    r = plan_cli(cli, DATA / "llama-3.1-405b", "--tp", 8, *[x for kv in args.items() for x in kv])
    assert r.exit_code == 1
    assert f"{option} {value}: give a unit, e.g. {value}GB or {value}GiB" in r.stderr
    assert plan_cli(cli, DATA / "llama-3.1-405b", "--tp", 8, "--gpu-memory", "141GB", "--reserve", "0").exit_code == 0
