"""A TP forward pass from the shards matches the unsharded transformers model.

One process per rank, joined by torch.distributed (gloo); each rank reads only its own shard files
and runs the reference forward of tests/support.tp_forward.py. All cases of one TP size share one process
group, so the suite pays process start-up once per TP size.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from support.tp_forward import MODELS, PROMPT, load_rank, reference_logits, run_tp, shard_cached

RTOL, ATOL = 1e-4, 1e-5
FP8_CASES = {  # (model, scale granularity) -> bound on ||logits - bf16 logits|| / ||bf16 logits||
    ("llama_gqa", "channel"): 0.10,
    ("llama_gqa", "tensor"): 0.15,
    ("mixtral", "channel"): 0.12,
}


def _mutant(tmp_root) -> object:
    """The TP-2 Llama shards with rank 0's and rank 1's pieces of one q_proj swapped."""
    good = shard_cached("llama_gqa", 2)
    bad = tmp_root / "llama-swapped-q"
    shutil.copytree(good, bad)
    name = "model.layers.1.self_attn.q_proj.weight"
    ranks = [load_rank(bad, r) for r in range(2)]
    ranks[0][name], ranks[1][name] = ranks[1][name], ranks[0][name]
    for r in range(2):
        save_file(ranks[r], bad / f"model-rank-{r}-part-0.safetensors")
    return bad


@pytest.fixture(scope="module")
def tp_logits(tmp_path_factory):
    cache: dict[int, dict[tuple, torch.Tensor]] = {}

    def get(tp: int) -> dict[tuple, torch.Tensor]:
        if tp not in cache:
            cases = {(kind, "fp32"): shard_cached(kind, tp) for kind in sorted(MODELS)}
            if tp == 2:
                for kind, granularity in FP8_CASES:
                    cases[(kind, granularity)] = shard_cached(
                        kind, tp, dtype="bfloat16", quantize="fp8", fp8_scale=granularity
                    )
                cases[("llama_gqa", "bf16")] = shard_cached("llama_gqa", tp, dtype="bfloat16")
                cases[("llama_gqa", "mutant")] = _mutant(tmp_path_factory.mktemp("mutant"))
            keys = list(cases)
            cache[tp] = dict(zip(keys, run_tp([(cases[k], PROMPT) for k in keys], tp, backend="gloo")))
        return cache[tp]

    return get


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tp_forward_matches_unsharded_model(tp_logits, kind, tp):
    got = tp_logits(tp)[(kind, "fp32")]
    torch.testing.assert_close(got, reference_logits(kind), rtol=RTOL, atol=ATOL)


def test_tp_forward_notices_a_wrong_layout(tp_logits):
    # The check has teeth: swapping two ranks' heads of one projection changes the logits.
    got = tp_logits(2)[("llama_gqa", "mutant")]
    assert not torch.allclose(got, reference_logits("llama_gqa"), rtol=RTOL, atol=ATOL)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind,granularity", sorted(FP8_CASES))
def test_fp8_error_against_bf16_is_bounded(tp_logits, kind, granularity):
    ref = reference_logits(kind, "bfloat16")
    got = tp_logits(2)[(kind, granularity)]
    err = _rel(got, ref)
    # E4M3 rounds each weight by at most 2^-4 relative; through two layers on a random model that is a few %.
    assert 0 < err < FP8_CASES[(kind, granularity)], f"relative logit error {err:.4f}"
    # The fixed prompt's next token (last position) is the same, and nearly every position agrees.
    assert got[0, -1].argmax() == ref[0, -1].argmax()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75, f"top-1 agreement {agree:.2f}"


def test_fp8_per_channel_top1_agrees_everywhere(tp_logits):
    ref = reference_logits("llama_gqa", "bfloat16")
    got = tp_logits(2)[("llama_gqa", "channel")]
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # And the bf16 shards themselves are exact up to summation order: the error above is FP8's alone.
    assert _rel(tp_logits(2)[("llama_gqa", "bf16")], ref) < 1e-3
