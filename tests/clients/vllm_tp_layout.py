"""Compares each tensor-parallel rank the daemon serves (a version written by ``hotweights.vllm_layout``,
or one loaded with ``--layout vllm``) with what vLLM's own weight loaders build for that rank from the
Hugging Face checkpoint.

    vllm_tp_layout.py SOCKET REF HF_DIR TP

vLLM's layers (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
ParallelLMHead) are built as rank r of TP and filled by their own ``weight_loader``; only the
tensor-parallel group is stood in for (its rank and size), so no process group or second process is
needed. Prints one JSON line: per rank, the names that differ, are missing or are extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock


def vllm_rank(sd: dict, cfg: dict, rank: int, tp: int) -> dict:
    import torch
    import vllm.distributed.parallel_state as ps
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import linear as lin
    from vllm.model_executor.layers import vocab_parallel_embedding as voc

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, inter, vocab = cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    group = type("TPGroup", (), {"rank_in_group": rank, "world_size": tp})()
    out = {}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with mock.patch.object(ps, "get_tp_group", lambda: group), set_current_vllm_config(VllmConfig()):
            for i in range(cfg["num_hidden_layers"]):
                p = f"model.layers.{i}."
                qkv_bias = p + "self_attn.q_proj.bias" in sd
                qkv = lin.QKVParallelLinear(hidden, head_dim, heads, kv, bias=qkv_bias)
                for s in "qkv":
                    qkv.weight.weight_loader(qkv.weight, sd[f"{p}self_attn.{s}_proj.weight"], s)
                    if qkv_bias:
                        qkv.bias.weight_loader(qkv.bias, sd[f"{p}self_attn.{s}_proj.bias"], s)
                out[p + "self_attn.qkv_proj.weight"] = qkv.weight.data
                if qkv_bias:
                    out[p + "self_attn.qkv_proj.bias"] = qkv.bias.data
                o = lin.RowParallelLinear(heads * head_dim, hidden, bias=False)
                o.weight.weight_loader(o.weight, sd[p + "self_attn.o_proj.weight"])
                out[p + "self_attn.o_proj.weight"] = o.weight.data
                gu = lin.MergedColumnParallelLinear(hidden, [inter, inter], bias=False)
                for j, s in enumerate(("gate", "up")):
                    gu.weight.weight_loader(gu.weight, sd[f"{p}mlp.{s}_proj.weight"], j)
                out[p + "mlp.gate_up_proj.weight"] = gu.weight.data
                down = lin.RowParallelLinear(inter, hidden, bias=False)
                down.weight.weight_loader(down.weight, sd[p + "mlp.down_proj.weight"])
                out[p + "mlp.down_proj.weight"] = down.weight.data
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    out[f"{p}{norm}.weight"] = sd[f"{p}{norm}.weight"]  # replicated: vLLM copies it whole
            out["model.norm.weight"] = sd["model.norm.weight"]
            emb = voc.VocabParallelEmbedding(vocab, hidden)
            emb.weight.weight_loader(emb.weight, sd["model.embed_tokens.weight"])
            out["model.embed_tokens.weight"] = emb.weight.data
            if not cfg.get("tie_word_embeddings", False):
                head = voc.ParallelLMHead(vocab, hidden)
                head.weight.weight_loader(head.weight, sd["lm_head.weight"])
                out["lm_head.weight"] = head.weight.data
    finally:
        torch.set_default_dtype(old)
    return out


def main() -> None:
    import torch
    from safetensors.torch import load_file

    import hotweights

    sock, ref, hf, tp = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    cfg = json.loads((hf / "config.json").read_text())
    sd = load_file(str(hf / "model.safetensors"))
    client = hotweights.connect(sock)
    result = {}
    for rank in range(tp):
        want = vllm_rank(sd, cfg, rank, tp)
        with client.attach(ref, rank=rank) as att:
            got = {k: att[k] for k in att}
            result[rank] = {
                "world_size": att.world_size,
                "compared": len(want),
                "differ": sorted(k for k in want if k in got and not torch.equal(got[k], want[k])),
                "missing": sorted(set(want) - set(got)),
                "extra": sorted(set(got) - set(want)),
            }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
