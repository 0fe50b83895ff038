"""Tiny random transformers checkpoints (``save_pretrained`` output) for the serving tests.

The head dimension is 32 or more because vLLM's CPU attention kernels need that; the Llama has
grouped-query attention (fewer KV heads than query heads) and untied output embeddings, the Qwen2
q/k/v biases and tied embeddings, so between them they cover what binding has to get right.
"""

from __future__ import annotations

from pathlib import Path


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = {
        "vocab_size": 16000,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    kw = {
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    kw.update(overrides)
    return Qwen2Config(**kw)


def phi3_config(**overrides):
    """Phi-3: transformers' own module fuses q|k|v (``qkv_proj``) and gate|up (``gate_up_proj``), as a
    serving engine's layout does, so those names alone do not tell an engine layout."""
    from transformers import Phi3Config

    kw = {
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    kw.update(overrides)
    return Phi3Config(**kw)


def tiny_llama_config(**overrides):
    """The vLLM tests' Llama: vocabulary 500 (vLLM pads it to 512, so the layout must add zero rows), GQA
    with 4 query and 2 KV heads, head_dim 32 (vLLM's CPU kernels need at least that)."""
    kw = {
        "vocab_size": 500,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    }
    kw.update(overrides)
    return llama_config(**kw)


def tiny_qwen2_config(**overrides):
    """The layout tests' Qwen2: q/k/v biases, tied embeddings, vocabulary 1000 (vLLM pads it to 1024)."""
    kw = {
        "vocab_size": 1000,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    kw.update(overrides)
    return qwen2_config(**kw)


def tiny_mixtral_config(**overrides):
    """A Mixtral of 4 experts (2 a token), GQA, vocabulary 500 (vLLM pads it to 512)."""
    from transformers import MixtralConfig

    kw = {
        "vocab_size": 500,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    kw.update(overrides)
    return MixtralConfig(**kw)


def save_model(config, directory: Path, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A randomly initialised model of ``config`` saved with ``save_pretrained`` (config.json beside it)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        # biases are zeros after init; random ones make a q/k/v bias mix-up show in the logits
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(str(directory))
    return directory


def weight_bytes(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"BF16": 2, "F16": 2, "F32": 4}[t.get_dtype()]
    return total
