"""On GPUs: the TP forward from the shards over NCCL, one process per GPU.

Skips cleanly without two CUDA GPUs or without NCCL.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return f"needs 2 CUDA GPUs (torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0})"
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        return "torch.distributed has no NCCL"
    return None


KINDS = ["llama_gqa", "qwen2", "qwen3", "mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def nccl_logits():
    from support.tp_forward import PROMPT, run_tp, shard_cached

    return dict(zip(KINDS, run_tp([(shard_cached(kind, 2), PROMPT) for kind in KINDS], 2, backend="nccl")))


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
@pytest.mark.parametrize("kind", KINDS)
def test_tp2_forward_over_nccl_matches_unsharded_model(nccl_logits, kind):
    from support.tp_forward import reference_logits

    torch.testing.assert_close(nccl_logits[kind], reference_logits(kind), rtol=1e-4, atol=1e-5)
