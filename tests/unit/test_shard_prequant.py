"""Already-quantized sources: split as bytes along the right dims, or refused with the reason.

The sources are synthetic (random packed words and scales laid out as GPTQ, AWQ and FP8 checkpoints
store them): only the layout matters for a byte split.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_shard_roundtrip import assert_bit_equal

from hotweights.errors import InvalidArgument
from hotweights.format.manifest import load_manifest
from hotweights.tools.shard import shard_checkpoint
from hotweights.tools.shard.quantize import quantize_fp8
from support.tp_forward import build_model, reassemble, source_tensors

LINEAR = re.compile(r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def quantized_source(
    tmp_path: Path, method: str, *, group_size: int = 16, desc_act: bool = False, block: int = 16
) -> Path:
    """The tiny Llama rewritten as a ``method`` checkpoint (linear layers only, like the real ones)."""
    src, _ = build_model("llama_gqa")
    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for name, w in source_tensors(src).items():
        if not LINEAR.match(name):
            out[name] = w.half() if method in ("gptq", "awq") else w.bfloat16()
            continue
        o, i = w.shape
        base = name.removesuffix(".weight")

        def ints(*shape: int) -> torch.Tensor:
            return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=g)

        if method == "gptq":
            out[base + ".qweight"] = ints(i // 8, o)
            out[base + ".qzeros"] = ints(i // group_size, o // 8)
            out[base + ".scales"] = torch.rand(i // group_size, o, generator=g).half()
            out[base + ".g_idx"] = torch.arange(i, dtype=torch.int32) // group_size
        elif method == "awq":
            out[base + ".qweight"] = ints(i, o // 8)
            out[base + ".qzeros"] = ints(i // group_size, o // 8)
            out[base + ".scales"] = torch.rand(i // group_size, o, generator=g).half()
        elif method == "fp8-channel":
            q, s = quantize_fp8(w, "channel")
            out[name], out[base + ".weight_scale"] = q, s
        elif method == "fp8-block":
            out[name] = w.to(torch.float8_e4m3fn)
            out[base + ".weight_scale_inv"] = torch.rand(-(-o // block), -(-i // block), generator=g)
    d = tmp_path / f"src-{method}"
    d.mkdir()
    save_file(out, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": True},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True},
        "fp8-channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
        "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block]},
    }[method]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("method", ["gptq", "awq", "fp8-channel", "fp8-block"])
def test_quantized_source_split_as_bytes(tmp_path, method, tp):
    src = quantized_source(tmp_path, method)
    out = tmp_path / "out"
    shard_checkpoint(src, out, tp)
    assert_bit_equal(reassemble(out), source_tensors(src))
    m = load_manifest(out)
    assert m.doc["quantization"]["from_source"] is True
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]
        == json.loads((src / "config.json").read_text())["quantization_config"]
    )


def test_gptq_split_dims(tmp_path):
    out = tmp_path / "out"
    shard_checkpoint(quantized_source(tmp_path, "gptq"), out, 2)
    by = {(t["name"], t["rank"]): t for t in load_manifest(out).tensors}
    p = "model.layers.0.self_attn."
    # Column-parallel q_proj: GPTQ stores [in, out], so the output split is along dim 1.
    assert by[(p + "q_proj.qweight", 1)]["split"] == {"dim": 1, "index": 1, "of": 2}
    assert by[(p + "q_proj.qzeros", 1)]["split"] == {"dim": 1, "index": 1, "of": 2}
    assert by[(p + "q_proj.g_idx", 1)]["split"] is None
    # Row-parallel o_proj: the input split is along dim 0, groups and g_idx with it.
    assert by[(p + "o_proj.qweight", 1)]["split"] == {"dim": 0, "index": 1, "of": 2}
    assert by[(p + "o_proj.scales", 1)]["split"] == {"dim": 0, "index": 1, "of": 2}
    assert by[(p + "o_proj.g_idx", 1)]["split"] == {"dim": 0, "index": 1, "of": 2}


def test_gptq_groups_that_a_split_would_cut_are_refused(tmp_path):
    # group_size 32 over o_proj's 64 inputs: 2 groups cannot go to 4 ranks.
    src = quantized_source(tmp_path, "gptq", group_size=32)
    with pytest.raises(InvalidArgument, match=r"o_proj\.(scales|qzeros)'.*does not split into 4"):
        shard_checkpoint(src, tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()


def test_gptq_act_order_row_split_is_refused(tmp_path):
    src = quantized_source(tmp_path, "gptq", desc_act=True)
    with pytest.raises(InvalidArgument, match=r"desc_act=true.*(o_proj|down_proj).*input dimension is unsafe"):
        shard_checkpoint(src, tmp_path / "out", 2)


def test_fp8_block_scales_not_aligned_to_the_split_are_refused(tmp_path):
    # 32x32 blocks: q_proj's 64 rows on 4 ranks are 16 rows each, half a block.
    src = quantized_source(tmp_path, "fp8-block", block=32)
    with pytest.raises(InvalidArgument, match=r"weight_scale_inv.*not a multiple of the 32 block"):
        shard_checkpoint(src, tmp_path / "out", 4)


def test_quantizing_an_already_quantized_source_is_refused(tmp_path):
    src = quantized_source(tmp_path, "fp8-channel")
    with pytest.raises(InvalidArgument, match="already quantized"):
        shard_checkpoint(src, tmp_path / "out", 2, quantize="fp8")


@pytest.mark.parametrize(
    "qc,reason",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "weight_shape"),
        ({"quant_method": "hqq"}, "not supported"),
    ],
)
def test_unsafe_or_unknown_quantization_is_refused(tmp_path, qc, reason):
    src, _ = build_model("llama_gqa")
    d = tmp_path / "src"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgument, match=reason):
        shard_checkpoint(d, tmp_path / "out", 2)
