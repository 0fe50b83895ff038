"""A transformers model whose weights are the daemon's memory.

    from hotweights.transformers import from_hotweights

    model = from_hotweights("llama-8b")          # a ready, eval-mode model; zero copy
    logits = model(input_ids).logits
    model.hotweights_release()                   # or drop the model: the lease ends with it

The model is built as ``from_pretrained`` builds it (same class, same config, same dtype, buffers
computed by the model's own code) except that no weight is allocated, read or copied: every
parameter is bound to the attached tensor of the same name (``hotweights.torch.bind``). The weights
are read-only (see ``hotweights.torch``): this is for inference, not training.

The config comes from the checkpoint directory the daemon loaded the version from (its
``config.json``), unless the caller passes one. Only unsplit (tp=1) checkpoints fit a transformers
model; a version sharded for tensor parallelism is refused.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import torch

import hotweights
from hotweights import errors, sources
from hotweights.torch import bind, skeleton

__all__ = ["from_hotweights", "source_dir"]


def from_hotweights(
    ref: str,
    rank: int = 0,
    *,
    client: hotweights.Client | None = None,
    socket: str | None = None,
    config: Any = None,
    model_class: Any = None,
    dtype: torch.dtype | str | None = None,
    holder: str = "",
    strict: bool = True,
    **model_kwargs: Any,
):
    """Attaches ``ref`` (NAME, NAME@VERSION or alias) and returns a transformers model bound to it.

    - ``client`` / ``socket``: the daemon to ask (default: ``hotweights.connect(socket)``).
    - ``config``: a ``PretrainedConfig``, or a directory or ``config.json`` path; default: the
      ``config.json`` beside the checkpoint the version was loaded from.
    - ``model_class``: default ``AutoModelForCausalLM`` (any transformers auto class or model class).
    - ``dtype``: the parameters' dtype; default the config's ``dtype`` and then the checkpoint's, as
      ``from_pretrained`` chooses. It must be the attached dtype: zero copy converts nothing.
    - ``model_kwargs``: passed to the model class's ``from_config`` (e.g. ``attn_implementation``).

    The model lives on the attachment's device (CPU for the cpu backend, the rank's GPU for the
    cuda backend). It holds the lease: ``model.hotweights_release()`` ends it, and so does dropping
    the model. Any mismatch between the module and the attached tensors raises one
    ``hotweights.errors.BindError`` naming every offender, and then nothing stays leased. Saved
    tensors that ``from_pretrained`` also passes over are not offenders: the model's own computed
    (non-persistent) buffers and the class's ``_keys_to_ignore_on_load_unexpected``.

    A caller's ``client`` must stay open while the model is in use: closing it ends the lease (see
    ``Client.close``).
    """
    owned = client is None
    client = client or hotweights.connect(socket)
    att = None
    try:
        att = client.attach(ref, rank=rank, holder=holder or f"transformers:{os.getpid()}")
        if att.world_size != 1:
            raise errors.BindError(
                f"{att.key} is split for tensor parallelism (tp={att.world_size}); a transformers model "
                f"loads an unsplit checkpoint (tp=1): load the unsplit checkpoint as its own version",
                tp_attached=att.world_size,
                tp_wanted=1,
            )
        listed = client.listed_version(att.name, att.version)
        laid = _engine_layout(listed)
        if laid:
            raise errors.BindError(
                f"{att.key} is served in {laid}, whose fused tensors are not transformers' own: load the "
                f"Hugging Face checkpoint without a layout as a version of its own for transformers",
                layout=laid,
            )
        cfg = _config(config, att, listed)
        dtype = _dtype(dtype, cfg, att)
        model = _build(cfg, model_class, dtype, model_kwargs)
        bind(model, att, strict=strict, ignore_unexpected=_ignored_as_from_pretrained(model))
        device = _device(att)
        if device.type != "cpu":
            model.to(device)  # moves only the buffers: bound parameters are there already
        model.requires_grad_(False)
        model.eval()
        _generation_config(model, cfg)
    except BaseException:
        if att is not None:
            att.release()
        if owned:
            client.close()
        raise
    model.hotweights_attachment = att
    model.hotweights_release = weakref.finalize(model, _release, att, client if owned else None)
    return model


def _ignored_as_from_pretrained(model):
    """The saved names ``from_pretrained`` loads past without complaint: the model's own computed
    (non-persistent) buffers, the patterns its classes list in ``_keys_to_ignore_on_load_unexpected``,
    and, as transformers adds them itself, the rotary ``inv_freq`` older versions saved in every layer
    and ``position_ids``, where the model now computes those buffers."""
    import re

    computed = {
        f"{mod_name}.{attr}" if mod_name else attr
        for mod_name, mod in model.named_modules()
        for attr in mod._non_persistent_buffers_set
    }
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        patterns.add(r"(^|\.)position_ids$")
    compiled = [re.compile(p) for p in patterns]
    return lambda name: name in computed or any(p.search(name) for p in compiled)


def _release(att, client) -> None:
    att.release()
    if client is not None:
        client.close()


def _engine_layout(listed) -> str:
    """Which serving engine's layout the version is in ("" for its files' own): loaded with
    ``--layout`` or written by the offline converter. Not told by names: some transformers models
    (Phi-3) fuse q|k|v and gate|up themselves."""
    if listed is None:
        return ""
    if listed.layout:
        return f"layout {listed.layout} (loaded with --layout {listed.layout})"
    if sources.written_in_engine_layout(listed.source):
        return "vLLM's layout (written by python -m hotweights.vllm_layout)"
    return ""


def source_dir(client: hotweights.Client, name: str, version: str) -> Path | None:
    """The directory the daemon loaded ``name@version`` from (a file's parent), if it still reports it."""
    for v in client.list().versions:
        if v.name == name and v.version == version and v.source:
            return sources.checkpoint_dir(v.source)
    return None


def _config(config: Any, att, listed):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if config is None:
        where = sources.checkpoint_dir(listed.source) if listed is not None else None
        if where is None or not (where / "config.json").is_file():
            raise errors.InvalidArgument(
                f"{att.key}: no config.json beside its checkpoint ({where or 'source unknown'}); "
                f"pass config= (a PretrainedConfig or a directory holding config.json)"
            )
        config = where
    path = Path(config)
    if path.name == "config.json":
        path = path.parent
    return AutoConfig.from_pretrained(str(path))


def _dtype(dtype, cfg, att) -> torch.dtype:
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    configured = getattr(cfg, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    # as from_pretrained does without a config dtype: the checkpoint's first floating tensor
    for name in att:
        t = att[name]
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _build(cfg, model_class, dtype: torch.dtype, model_kwargs: dict):
    import copy

    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    # from_pretrained deep-copies the config too; the model keeps its own, with the resolved dtype
    cfg = copy.deepcopy(cfg)
    with skeleton():
        make = getattr(cls, "from_config", None) or getattr(cls, "_from_config")  # noqa: B009
        model = make(cfg, dtype=dtype, **model_kwargs)
    # from_pretrained ties after loading; the same tying on the skeleton makes the shared names one
    # parameter, which bind then points at the one attached tensor
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _device(att) -> torch.device:
    for name in att:
        return att[name].device
    return torch.device("cpu")


def _generation_config(model, cfg) -> None:
    if not getattr(model, "can_generate", lambda: False)():
        return
    where = getattr(cfg, "_name_or_path", "") or ""
    if where and (Path(where) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(where)
