"""``hotweights.torch.skeleton``: what building a model inside it allocates and runs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hotweights.torch import skeleton  # noqa: E402
from support.tp_forward import TINY  # noqa: E402


def _tiny_llama():
    return transformers.LlamaConfig(**TINY)


def test_parameters_are_meta_and_buffers_are_computed_as_a_normal_build_computes_them():
    torch.manual_seed(0)
    normal = transformers.LlamaForCausalLM(_tiny_llama())
    with skeleton():
        built = transformers.LlamaForCausalLM(_tiny_llama())
    assert {p.device.type for p in built.parameters()} == {"meta"}
    buffers = dict(built.named_buffers())
    assert buffers, "a Llama has rotary buffers"
    for name, ref in normal.named_buffers():
        assert buffers[name].device.type == "cpu"
        assert torch.equal(buffers[name], ref), name


def test_transformers_initialisers_do_not_run_on_the_skeletons_parameters(monkeypatch):
    """They would write nothing on meta, yet cost a call each: a large model has over a thousand."""
    from transformers import initialization

    calls: list[tuple[str, str]] = []
    for fn_name, fn in list(initialization.TORCH_INIT_FUNCTIONS.items()):

        def counted(tensor, *args, _fn=fn, _name=fn_name, **kwargs):
            calls.append((_name, tensor.device.type))
            return _fn(tensor, *args, **kwargs)

        monkeypatch.setitem(initialization.TORCH_INIT_FUNCTIONS, fn_name, counted)
    transformers.LlamaForCausalLM(_tiny_llama())
    assert any(device == "cpu" for _, device in calls), "the counter sees a normal build's initialisers"
    calls.clear()
    with skeleton():
        transformers.LlamaForCausalLM(_tiny_llama())
    assert [c for c in calls if c[1] == "meta"] == []
