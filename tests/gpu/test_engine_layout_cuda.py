"""vLLM's layout applied by the loader on the cuda backend: the fused tensors are exactly the offline
converter's, and the vocabulary padding reads as zero although device memory comes back dirty."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import backend, read_device

pytestmark = pytest.mark.gpu


def test_fused_tensors_are_exact_and_the_padding_is_zero_on_the_device(tmp_path):
    import torch
    from safetensors import safe_open

    from hotweights import vllm_layout
    from hotweights.cuda import devices as cd
    from hotweights.format.checkpoint import open_checkpoint
    from hotweights.format.engine_layout import rank_recipe
    from hotweightsd.core.backend import AllocationMode
    from hotweightsd.core.layout import plan_rank
    from support.models import save_model, tiny_llama_config

    hf = save_model(tiny_llama_config(), tmp_path / "hf")  # vocabulary 500, padded to 512
    config = json.loads((hf / "config.json").read_text())
    b = backend()
    allocs = []
    try:
        with open_checkpoint(hf) as ckpt:
            rf = ckpt.ranks[0]
            tensors = {t.name: (t.dtype.name, t.shape) for h in rf.files for t in h.tensors}
            layout = plan_rank(rf, b.granularity(0), b.max_allocation(), rank_recipe("vllm", config, 1, 0, tensors))
            assert layout.zeros, "a vocabulary of 500 is padded"
            # memory freed with 0xFF in it, so an allocation that reuses it would show a missing memset
            for size in layout.allocation_sizes:
                dirty = b.allocate(0, size, AllocationMode.FD)
                with cd.current(0) as drv:
                    cd.check(drv.cuMemsetD8(dirty.address, 0xFF, size), "cuMemsetD8")
                    cd.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")
                dirty.close()
            for size in layout.allocation_sizes:
                allocs.append(b.allocate(0, size, AllocationMode.FD))
            b.fill(layout, allocs, lambda n: None, threading.Event())
        for z in layout.zeros:
            a = allocs[z.allocation]
            assert read_device(0, a.address + z.offset, z.length) == bytes(z.length)
        with safe_open(str(hf / "model.safetensors"), "pt") as st:
            want = vllm_layout.build_rank(st.get_tensor, list(st.keys()), config, 1, 0)
            served = layout.table()
            assert sorted(p.name for p in served) == sorted(want)
            for p in served:
                a = allocs[p.allocation]
                expect = want[p.name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                assert read_device(0, a.address + p.offset, p.nbytes) == expect, p.name
    finally:
        for a in allocs:
            a.close()
        b.close()
