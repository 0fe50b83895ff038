"""A small tensor-parallel reference forward pass computed from hotweights shards (a test helper).

It checks the *semantics* of a shard layout: if each rank, holding only its own shard tensors,
computes its part of a Llama-style forward and the ranks combine through all-reduce, the logits
must equal the unsharded model's. It covers embeddings (vocab-parallel), RMSNorm, rotary
embeddings (default RoPE), GQA attention split by heads (KV heads split or replicated), Qwen3's
q/k norms, SwiGLU MLPs (column then row parallel), Mixtral and Qwen-MoE sparse blocks (experts
split like MLPs, router replicated, Qwen2-MoE's gated shared expert) and a vocab-parallel lm_head
(tied or not). FP8 weights are dequantized with their ``weight_scale``. Everything runs in fp32.

Ranks are separate processes joined by torch.distributed (gloo on CPU, nccl on GPUs). The tiny
random transformers models the stage 1 tests shard live here too, built once per test process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open

MANIFEST = "hotweights.json"


# ----------------------------------------------------------------------------- reading shards


def load_rank(directory: str | Path, rank: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one rank, read from that rank's files only."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    out: dict[str, torch.Tensor] = {}
    for name, info in manifest["files"].items():
        if info["rank"] != rank:
            continue
        with safe_open(directory / name, "pt", device=device) as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def reassemble(directory: str | Path) -> dict[str, torch.Tensor]:
    """The unsharded tensors, rebuilt from the shards by the manifest's split records alone.

    Replicated copies must agree byte for byte; split pieces are concatenated in index order, each
    index taken once (ranks that share a replicated KV head hold identical pieces, also checked).
    """
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    ranks = {r: load_rank(directory, r) for r in range(manifest["tp_size"])}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    dims: dict[str, tuple[int, int]] = {}
    whole: dict[str, torch.Tensor] = {}
    for t in manifest["tensors"]:
        data = ranks[t["rank"]][t["name"]]
        assert list(data.shape) == t["shape"] and _st_dtype(data.dtype) == t["dtype"], t
        split = t["split"]
        if split is None:
            if t["name"] in whole:
                assert _same_bytes(whole[t["name"]], data), f"replicas of {t['name']} differ"
            whole[t["name"]] = data
            continue
        dims[t["name"]] = (split["dim"], split["of"])
        have = pieces.setdefault(t["name"], {})
        if split["index"] in have:
            assert _same_bytes(have[split["index"]], data), f"replicas of {t['name']} piece {split['index']} differ"
        have[split["index"]] = data
    for name, got in pieces.items():
        dim, of = dims[name]
        assert sorted(got) == list(range(of)), f"{name}: pieces {sorted(got)} of {of}"
        whole[name] = torch.cat([got[i] for i in range(of)], dim=dim)
    return whole


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


_ST = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.int8: "I8",
}


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST[dtype]


# ----------------------------------------------------------------------------- the forward pass


class _Comm:
    def __init__(self, rank: int, tp: int) -> None:
        self.rank = rank
        self.tp = tp

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


class TPModel:
    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int, tp: int) -> None:
        self.c = config
        self.t = tensors
        self.comm = _Comm(rank, tp)
        self.rank = rank
        self.tp = tp
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        rope = config.get("rope_parameters") or {}
        self.theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
            raise NotImplementedError("only default RoPE in the reference forward")

    def w(self, name: str) -> torch.Tensor:
        """A weight in fp32, dequantized where the shard holds it as FP8 with a weight_scale."""
        x = self.t[name]
        scale = self.t.get(name.removesuffix(".weight") + ".weight_scale")
        if x.dtype == torch.float8_e4m3fn:
            assert scale is not None, f"{name} is FP8 without a weight_scale"
            return x.to(torch.float32) * scale.to(torch.float32)
        return x.to(torch.float32)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.w(name) if name in self.t else None

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.w(name) * (x * torch.rsqrt(var + self.eps))

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.w(prefix + ".weight"), self.maybe(prefix + ".bias"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        n_layers = self.c["num_hidden_layers"]
        for i in range(n_layers):
            p = f"model.layers.{i}."
            x = x + self.attention(self.norm(x, p + "input_layernorm.weight"), p + "self_attn.")
            x = x + self.mlp(self.norm(x, p + "post_attention_layernorm.weight"), p)
        x = self.norm(x, "model.norm.weight")
        head = self.w("lm_head.weight") if "lm_head.weight" in self.t else self.w("model.embed_tokens.weight")
        return self.comm.all_gather_last(F.linear(x, head))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w("model.embed_tokens.weight")
        start = self.rank * table.shape[0]
        local = ids - start
        inside = (local >= 0) & (local < table.shape[0])
        x = F.embedding(local.clamp(0, table.shape[0] - 1), table) * inside.unsqueeze(-1)
        return self.comm.all_reduce(x)

    def rotary(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        q = self.linear(x, p + "q_proj").view(b, s, -1, hd)
        k = self.linear(x, p + "k_proj").view(b, s, -1, hd)
        v = self.linear(x, p + "v_proj").view(b, s, -1, hd)
        assert q.shape[2] == self.heads // self.tp, "q_proj does not hold this rank's heads"
        assert k.shape[2] == max(self.kv_heads // self.tp, 1), "k_proj does not hold this rank's KV heads"
        if p + "q_norm.weight" in self.t:  # Qwen3
            q = self.norm(q, p + "q_norm.weight")
            k = self.norm(k, p + "k_norm.weight")
        cos, sin = self.rotary(s, x.device)
        q, k = self.rope(q, cos[:, None], sin[:, None]), self.rope(k, cos[:, None], sin[:, None])
        group = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(mask, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, -1)
        out = self.comm.all_reduce(F.linear(out, self.w(p + "o_proj.weight")))
        bias = self.maybe(p + "o_proj.bias")
        return out + bias if bias is not None else out

    def swiglu(self, x: torch.Tensor, gate: str, up: str, down: str) -> torch.Tensor:
        return F.linear(F.silu(self.linear(x, gate)) * self.linear(x, up), self.w(down + ".weight"))

    def mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        if p + "block_sparse_moe.gate.weight" in self.t:  # Mixtral
            m = p + "block_sparse_moe."
            out = self.moe(
                x,
                m + "gate.weight",
                lambda e, h: self.swiglu(h, f"{m}experts.{e}.w1", f"{m}experts.{e}.w3", f"{m}experts.{e}.w2"),
                normalize=True,
            )
        elif p + "mlp.gate.weight" in self.t:  # Qwen2-MoE / Qwen3-MoE
            m = p + "mlp."
            out = self.moe(
                x,
                m + "gate.weight",
                lambda e, h: self.swiglu(
                    h, f"{m}experts.{e}.gate_proj", f"{m}experts.{e}.up_proj", f"{m}experts.{e}.down_proj"
                ),
                normalize=bool(self.c.get("norm_topk_prob", False)),
            )
            if m + "shared_expert.gate_proj.weight" in self.t:
                shared = self.swiglu(
                    x, m + "shared_expert.gate_proj", m + "shared_expert.up_proj", m + "shared_expert.down_proj"
                )
                # The gate is computed from the full x on every rank, so scaling a partial sum is exact.
                out = out + torch.sigmoid(F.linear(x, self.w(m + "shared_expert_gate.weight"))) * shared
        else:
            m = p + "mlp."
            out = self.swiglu(x, m + "gate_proj", m + "up_proj", m + "down_proj")
        out = self.comm.all_reduce(out)
        down_bias = self.maybe(p + "mlp.down_proj.bias")
        return out + down_bias if down_bias is not None else out

    def moe(self, x: torch.Tensor, router: str, expert, normalize: bool) -> torch.Tensor:
        k = self.c["num_experts_per_tok"]
        probs = F.linear(x, self.w(router)).softmax(-1)
        weights, chosen = probs.topk(k, dim=-1)
        if normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(probs.shape[-1]):
            hit = chosen == e  # [b, s, k]
            if not hit.any():
                continue
            w = (weights * hit).sum(-1, keepdim=True)  # 0 where the token did not pick e
            out = out + w * expert(e, x)
        return out


# ----------------------------------------------------------------------------- processes


def _worker(rank: int, tp: int, init_file: str, backend: str, cases: list[dict[str, Any]]) -> None:
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
        # TF32 matmuls would cost more than the tests' 1e-4 tolerance: full fp32, like the CPU reference.
        torch.backends.cuda.matmul.allow_tf32 = False
    if tp > 1:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=tp)
    try:
        torch.manual_seed(0)
        for case in cases:
            config = json.loads((Path(case["dir"]) / "config.json").read_text())
            tensors = load_rank(case["dir"], rank, device=device)
            ids = torch.tensor(case["ids"], dtype=torch.long, device=device)
            with torch.no_grad():
                logits = TPModel(config, tensors, rank, tp).forward(ids)
            if rank == 0:
                torch.save(logits.cpu(), case["out"])
    finally:
        if tp > 1:
            dist.destroy_process_group()


def run_tp(
    cases: list[tuple[str | Path, list[list[int]]]], tp: int, backend: str = "gloo", timeout: float = 240
) -> list[torch.Tensor]:
    """Logits of each (shard dir, token ids) case, computed by ``tp`` processes sharing one process group.

    The ranks are plain ``python support.tp_forward.py SPEC RANK`` processes: nothing depends on how the
    caller was started (pytest, xdist, a script), unlike multiprocessing's spawn.
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="hw-tp-") as tmp:
        specs = [
            {"dir": str(d), "ids": ids, "out": os.path.join(tmp, f"logits-{i}.pt")} for i, (d, ids) in enumerate(cases)
        ]
        spec_file = os.path.join(tmp, "spec.json")
        Path(spec_file).write_text(
            json.dumps({"tp": tp, "backend": backend, "init": os.path.join(tmp, "init"), "cases": specs})
        )
        from support import child_env

        env = child_env(OMP_NUM_THREADS="1")  # tp processes share a few cores in CI
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, spec_file, str(r)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            for r in range(tp)
        ]
        failures = []
        for r, p in enumerate(procs):
            try:
                output, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                output, _ = p.communicate()
                failures.append(f"rank {r} timed out after {timeout} s:\n{output}")
                continue
            if p.returncode != 0:
                failures.append(f"rank {r} exited with {p.returncode}:\n{output}")
        if failures:
            raise AssertionError("\n".join(failures))
        return [torch.load(s["out"]) for s in specs]


def _main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[1]).read_text())
    _worker(int(argv[2]), spec["tp"], spec["init"], spec["backend"], spec["cases"])


def source_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory (test models are small)."""
    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


# ----------------------------------------------------------------------------- tiny test models

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.1,
)

# name -> (config class, model class, overrides). Each covers a rule family; see the comments.
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", {}),  # 4 heads, 2 KV heads: tp 4 replicates KV
    "llama_tied_bias": (
        "LlamaConfig",
        "LlamaForCausalLM",  # tied embeddings, o_proj/down_proj biases
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),  # q/k/v biases, one KV head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),  # q_norm / k_norm
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(  # experts + gated shared expert
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16),
    ),
}
PROMPT = [[3, 17, 42, 99, 5, 64, 127, 0, 31, 77, 12, 8]]

_root: Path | None = None
_built: dict[tuple, Path] = {}
_models: dict[tuple, Any] = {}


def scratch() -> Path:
    """One temporary directory per test process, shared by every test module that builds models."""
    global _root
    if _root is None:
        import atexit
        import shutil

        _root = Path(tempfile.mkdtemp(prefix="hw-shard-models-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def build_model(kind: str, dtype: str = "float32", seed: int = 0, max_shard_size: str | None = None):
    """(directory, model) of a tiny random model saved as a Hugging Face checkpoint; cached per process.

    Every parameter is random, norms and biases included (their defaults, ones and zeros, would hide
    a wrongly split or dropped bias or norm).
    """
    key = (kind, dtype, seed, max_shard_size)
    if key in _models:
        return _built[key], _models[key]
    import transformers

    cfg_cls, model_cls, overrides = MODELS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**{**TINY, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    d = scratch() / f"{kind}-{dtype}-{seed}-{max_shard_size or 'one'}"
    model.save_pretrained(d, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    _built[key], _models[key] = d, model
    return d, model


def shard_cached(kind: str, tp: int, dtype: str = "float32", **options: Any) -> Path:
    """A tiny model sharded with hotweights shard, cached per (model, tp, options)."""
    from hotweights.tools.shard import shard_checkpoint

    key = ("sharded", kind, tp, dtype, tuple(sorted(options.items())))
    if key not in _built:
        src, _ = build_model(kind, dtype)
        out = scratch() / ("-".join(str(k) for k in key[1:4]) + f"-{len(_built)}")
        shard_checkpoint(src, out, tp, **options)
        _built[key] = out
    return _built[key]


def reference_logits(kind: str, dtype: str = "float32", ids: list[list[int]] = PROMPT) -> torch.Tensor:
    """The unsharded transformers model's logits, in fp32."""
    _, model = build_model(kind, dtype)
    with torch.no_grad():
        return copy.deepcopy(model).float()(torch.tensor(ids)).logits.float()


if __name__ == "__main__":
    import sys

    _main(sys.argv)
