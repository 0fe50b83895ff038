"""vLLM model loader plugin: ``--load-format hotweights`` serves the weights the node's daemon holds.

Installed with the package, vLLM finds it through the ``vllm.general_plugins`` entry point and every
vLLM process (engine core, workers) registers the loader before loading a model:

    LLM(model="/models/llama-8b", load_format="hotweights",
        model_loader_extra_config={"model": "llama-8b", "socket": "/run/hotweights/hotweights.sock"})

``model`` (required) is the daemon's NAME, NAME@VERSION or alias; ``socket`` the daemon's socket
(default: hotweights' usual lookup); ``mode``:
- ``zero_copy``: the version must be in vLLM's layout, one rank per tensor-parallel rank: loaded with
  ``hotweights load NAME DIR --layout vllm`` (the daemon fuses and pads as it loads, from a Hugging Face
  directory or a ``hotweights shard`` checkpoint), or converted offline with ``python -m
  hotweights.vllm_layout`` and loaded as it is. Every vLLM parameter is bound to the attached tensor of
  the same name, no copy.
  vLLM's own post-processing then runs as usual; where it repacks a weight (vLLM's CPU kernels pack
  every linear weight into their own format), the packed copy is the engine's and the attached tensor
  is only read once. On a GPU with unquantized weights post-processing leaves them as they are.
- ``copy``: engine-owned parameters, each filled by one copy from the attachment: from a vLLM-layout
  version 1:1, or from an unsplit Hugging Face checkpoint through the same recipe (every rank attaches
  the version's one rank and takes its part, q|k|v and gate|up concatenated, vocabulary padded, built
  one parameter at a time), never through ``model.load_weights``. Floating dtypes are converted as
  vLLM's own loader converts them; the buffers a vLLM-saved checkpoint holds are copied too.
- ``auto`` (default): ``zero_copy`` for an unquantized vLLM-layout version, ``copy`` otherwise. A
  quantized model is always copied: vLLM's post-processing of quantized weights writes into them
  (requantizing to one scale, transposing for its kernels), which the daemon's read-only memory does not allow.
  Its attention's KV-cache scales, which FP8 checkpoints without calibration do not hold, keep the
  engine's defaults, as with vLLM's own loader.
Unknown keys, and values that are not non-empty strings, are an error. Online quantization (an engine
given ``quantization=...`` over an unquantized model directory) is refused: vLLM makes those weights on
the meta device and quantizes them inside its own weight loaders. The rotary buffers older checkpoints
hold (``rotary_emb.inv_freq``, ``cos_cached``, ``sin_cached``) are passed over, as vLLM's loaders do.
Tensors the daemon holds in another kind of memory than the engine's device (a cpu-backend daemon for a
GPU engine), or on another GPU, are copied by ``auto`` and refused by ``zero_copy``. The loader checks
the version's tensor-parallel size, architecture, quantization and dtype against the engine's and names
both sides when they differ. Whether a version
is in vLLM's layout is told by its rank's tensor names, by the memory report
(``get_external_weight_memory``) and the load alike.

The attachment (and so the daemon's lease) lives as long as the model: ``model.hotweights_attachment``.
This module is the only one that imports vLLM.
"""

from __future__ import annotations

import functools
import gc
import os
import re
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype

import hotweights
from hotweights import errors, sources
from hotweights import vllm_layout as layout
from hotweights.torch import bind, skeleton
from hotweights.wire.pb import pb

logger = init_logger(__name__)

LOAD_FORMAT = "hotweights"
MODES = ("auto", "zero_copy", "copy")
_KEYS = ("model", "socket", "mode")


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    if LOAD_FORMAT not in _registered():
        register_model_loader(LOAD_FORMAT)(HotweightsModelLoader)


def _registered() -> dict:
    from vllm.model_executor import model_loader

    return model_loader._LOAD_FORMAT_TO_MODEL_LOADER


def _tp() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


class HotweightsModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = sorted(set(extra) - set(_KEYS))
        if unknown:
            raise errors.InvalidArgument(
                f"load format {LOAD_FORMAT!r}: unknown model_loader_extra_config key(s) {unknown}; known: {list(_KEYS)}"
            )
        if not extra.get("model"):
            raise errors.InvalidArgument(
                f"load format {LOAD_FORMAT!r} needs model_loader_extra_config={{'model': NAME}} "
                f"(the daemon's model, version or alias)"
            )
        for key in _KEYS:
            value = extra.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise errors.InvalidArgument(
                    f"load format {LOAD_FORMAT!r}: model_loader_extra_config[{key!r}] must be a non-empty string, "
                    f"got {value!r:.80}",
                    key=key,
                )
        self.ref = str(extra["model"])
        self.socket = extra.get("socket")
        self.mode = extra.get("mode", "auto")
        if self.mode not in MODES:
            raise errors.InvalidArgument(
                f"load format {LOAD_FORMAT!r}: mode must be one of {list(MODES)}, got {self.mode!r}"
            )
        self.attached_bytes = 0
        self.report: dict = {}

    # --- what vLLM asks ------------------------------------------------------------------------

    def get_external_weight_memory(self, vllm_config: VllmConfig) -> int:
        """The rank's bytes that stay in the daemon's memory (zero copy): vLLM leaves them out of its budget."""
        if self.mode == "copy":
            return 0
        rank, _ = _tp()
        with hotweights.connect(self.socket) as client:
            listed = client.list()
            rank = _source_rank(_version_info(listed, self.ref), rank)
            names, info = _rank_names(client, self.ref, rank, listed)
        if info is None:
            return 0
        target = torch.device(
            vllm_config.device_config.device if self.load_config.device is None else self.load_config.device
        )
        if _other_memory(info.backend, target):
            # host memory (a daemon run with --backend cpu on a GPU node) is not the engine's device memory:
            # nothing to leave out of its budget, and the load copies (a zero copy there is refused)
            return 0
        config = sources.config_of(info.source) or {}
        if _copies(_in_engine_layout(names), config, vllm_config.model_config, target):
            return 0  # the engine owns the memory the weights are copied into
        # What the rank keeps resident (padding and allocation rounding too); bytes from older daemons.
        return next((int(r.resident_bytes or r.bytes) for r in info.ranks if r.rank == rank), 0)

    def download_model(self, model_config: ModelConfig) -> None:
        # The daemon holds the weights; only check that it knows the model.
        with hotweights.connect(self.socket) as client:
            if _version_info(client.list(), self.ref) is None:
                raise errors.NotFound(f"the hotweights daemon at {client.socket} has no model {self.ref!r}")

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Refills an already built model from the daemon (copies; the model keeps its memory)."""
        rank, tp = _tp()
        with hotweights.connect(self.socket) as client:
            att, listed = _attach(client, self.ref, rank, f"vllm-reload:{os.getpid()}")
            with att:
                _check_world(att, tp)
                config = _find_config(client, att, listed)
                _check_config(att, config, model_config, copy=True)
                self._copy_into(model, att, client, tp, rank, config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        rank, tp = _tp()
        device_config = vllm_config.device_config
        target = torch.device(device_config.device if self.load_config.device is None else self.load_config.device)
        client = hotweights.connect(self.socket)
        att = None
        try:
            att, listed = _attach(client, self.ref, rank, f"vllm:{os.getpid()}:tp{rank}")
            _check_world(att, tp)
            config = _find_config(client, att, listed)  # one read of config.json for every check below
            engine_layout = _in_engine_layout(att)
            rewritten = _experts_rewritten(config or {}, target)
            quantized = _quantized(config or {}, model_config)
            elsewhere = _elsewhere(att, target)
            copies = _copies(engine_layout, config or {}, model_config, target) or bool(elsewhere)
            mode = self.mode if self.mode != "auto" else ("copy" if copies else "zero_copy")
            _check_config(att, config, model_config, copy=mode == "copy")
            if mode == "zero_copy" and elsewhere:
                raise errors.InvalidArgument(
                    f"{att.key} rank {att.rank}: {elsewhere}; zero copy would make the model's parameters "
                    f"live there; use mode='copy' (or auto)"
                )
            if mode == "zero_copy" and not engine_layout:
                raise errors.InvalidArgument(
                    f"{att.key} is in the Hugging Face layout: zero copy needs vLLM's layout "
                    f"(hotweights load NAME DIR --layout vllm, or python -m hotweights.vllm_layout SRC OUT --tp {tp} "
                    f"and load OUT), or mode='copy'"
                )
            if mode == "zero_copy" and quantized:
                raise errors.InvalidArgument(
                    f"{att.key}: the engine's model is quantized ({model_config.quantization or 'by its checkpoint'}); "
                    f"vLLM post-processes quantized weights in place, which the daemon's read-only memory does not "
                    f"allow; use mode='copy' (or auto)"
                )
            if mode == "zero_copy" and rewritten:
                raise errors.InvalidArgument(
                    f"{att.key}: on {target} vLLM's fused MoE kernels rewrite the experts in place after loading, "
                    f"which the daemon's read-only memory does not allow; use mode='copy' (or auto)"
                )
            with set_default_torch_dtype(model_config.dtype), target:
                if mode == "zero_copy":
                    with skeleton():
                        model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
                    held = _layout_names(model)
                    kept = _kept(att)
                    named = _bind_params_copy_buffers(model, _as_named_by(model, kept, held), att)
                    rep = bind(model, _Renamed(named, att, held))
                    self.attached_bytes = rep.nbytes
                    self.report = {"mode": mode, "bound": len(rep.bound), "tied": rep.tied, "bytes": rep.nbytes}
                else:
                    model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
                    self._copy_into(model, att, client, tp, rank, config)
                _release_transients()  # as vLLM's own loader does, before post-processing and after it
                process_weights_after_loading(model, model_config, target)
                _release_transients()
        except BaseException:
            if att is not None:
                att.release()
            client.close()
            raise
        if mode == "copy":
            att.release()  # every byte was copied: nothing to hold
            client.close()
        else:
            # the parameters alias the attachment: the lease lives with the model
            model.hotweights_attachment = att
            model.hotweights_client = client
        logger.info("hotweights: %s rank %d/%d loaded in %s mode (%s)", att.key, rank, tp, mode, self.report)
        return model.eval()

    # --- copy mode -----------------------------------------------------------------------------

    def _copy_into(self, model: nn.Module, att, client, tp: int, rank: int, config: dict | None = None) -> None:
        """Fills ``model``'s own parameters (and the buffers a vLLM-saved checkpoint holds) from ``att``: every
        name, shape and dtype is checked first, then each parameter is built (from a Hugging Face version:
        its rank's part, fused and padded) and copied one at a time, so that at most one fused tensor is
        alive beside the attachment."""
        params = dict(model.named_parameters())
        kept = _kept(att)
        buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        build: Callable[[str], torch.Tensor] | None = None
        if _in_engine_layout(att):
            named = _as_named_by(model, kept)
            buffers = _held_buffers(model, named, att, cast=True)
            sources = {name: named[name] for name in params if name in named}
            extra = sorted(set(named) - set(params))
        else:
            if att.world_size != 1:
                raise errors.InvalidArgument(
                    f"{att.key}: copy mode reads an unsplit Hugging Face checkpoint (tp=1) or a vLLM-layout one; "
                    f"this one is split for tp={att.world_size} in the Hugging Face layout"
                )
            if config is None:
                config = _checkpoint_config(client, att)
            _check_scales(att, kept)
            held = _layout_names(model)  # layout name -> the model's
            plan = layout.engine_names(kept)
            wanted = [n for n, m in held.items() if m in params and n in plan]
            # shapes and dtypes from the recipe on the meta device: nothing is built before the check
            on_meta = layout.build_rank(_meta_of(kept), list(kept), config, tp, rank, only=wanted)
            by_model = {held[k]: k for k in on_meta}
            sources = {held[k]: v for k, v in on_meta.items()}
            extra = sorted({held.get(n, n) for n in plan} - set(params) - {"lm_head.weight"})

            def one(name: str) -> torch.Tensor:
                k = by_model[name]
                return layout.build_rank(kept.__getitem__, plan[k], config, tp, rank, only=[k])[k]

            build = one

        _copy_checked(model, params, sources, extra, att, build=build)
        with torch.no_grad():
            for dst, src in buffers.values():
                dst.copy_(src)
        left = sorted(n for n, p in model.named_parameters() if p.is_meta)
        if left:
            raise errors.BindError(
                f"cannot fill {type(model).__name__} from {att.key} rank {att.rank}: {len(left)} parameter(s) are "
                f"still on the meta device after the copy (the engine's model holds no memory for them): "
                + ", ".join(left),
                missing=left,
            )
        self.attached_bytes = 0
        self.report = {
            "mode": "copy",
            "copied": len(sources),
            "bytes": sum(t.numel() * t.element_size() for t in sources.values()),
        }


# Tensors vLLM's model loaders pass over (Llama, Qwen2, Mixtral, Mistral ``load_weights``): the rotary
# embedding's buffers older conversions saved; the engine computes its own.
_SKIPPED = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)")


def _kept(att) -> dict[str, torch.Tensor]:
    """The attached tensors a load takes: all but those vLLM's own loaders pass over (``_SKIPPED``)."""
    return {n: att[n] for n in att if not _SKIPPED.search(n)}


def _meta_of(tensors: Mapping[str, torch.Tensor]):
    """A ``get`` for ``build_rank`` that gives each tensor's shape and dtype on the meta device (no memory)."""

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    return get


def _check_scales(att, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy mode cuts a Hugging Face rank's q/k/v and gate/up scales by rows, with their weights: one scale
    per tensor (FP8 as ``hotweights shard --fp8-scale tensor`` writes it) has no rows to cut, and vLLM
    holds it as one scale per fused part, which the recipe does not build."""
    scalar = sorted(
        n
        for n in tensors
        if n.endswith(".weight_scale")
        and tensors[n].numel() == 1
        and (layout.engine_layout.QKV.match(n) or layout.engine_layout.GATE_UP.match(n))
    )
    if scalar:
        raise errors.InvalidArgument(
            f"{att.key}: FP8 with one scale per tensor ({len(scalar)} scalar scales, e.g. {scalar[0]}) cannot be "
            f"copied from the Hugging Face layout: vLLM keeps one scale per q/k/v and gate/up part, which copy mode "
            f"does not build; write the checkpoint with one scale per output channel (hotweights shard "
            f"--quantize fp8, the default --fp8-scale channel) or serve it with vLLM's own loader",
            tensors=len(scalar),
        )


def _release_transients() -> None:
    """What vLLM's ``BaseModelLoader.load_model`` does after loading and after post-processing: frees the
    tensors made on the way (fused parts, repacked weights) and gives the allocator's cache back."""
    gc.collect()
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "empty_cache") and accelerator.is_available():
        accelerator.empty_cache()


def _in_engine_layout(names) -> bool:
    """Whether a rank's tensors are in vLLM's layout, told by their names: its fused q|k|v and gate|up.
    A version loaded with ``--layout vllm``, one the offline converter wrote and one vLLM's own
    ``save_sharded_state`` wrote (no layout, no marker) all hold them; the memory report and the load
    both decide by this, so that they agree."""
    return any(n.endswith(("qkv_proj.weight", "gate_up_proj.weight")) for n in names)


def _attach(client, ref: str, rank: int, holder: str):
    """Attaches the version's rank that engine rank ``rank`` reads: its own, or the only rank of an unsplit
    version (copy mode cuts the engine rank's part from it). Returns the attachment and the listing taken
    before it: a listing converts every version the daemon holds, so one call takes one and looks the
    attached version up in it."""
    listed = client.list()
    att = client.attach(ref, rank=_source_rank(_version_info(listed, ref), rank), holder=holder)
    if att.world_size > 1 and att.rank != rank:  # ``ref`` moved to a split version since the listing
        att.release()
        att = client.attach(ref, rank=rank, holder=holder)
    return att, listed


def _source_rank(info, rank: int) -> int:
    """0 for a version of one rank (an unsplit checkpoint serves every tensor-parallel rank), else ``rank``."""
    return 0 if info is not None and len(info.ranks) == 1 else rank


def _other_memory(backend: str, target: torch.device) -> bool:
    """Whether a version the daemon holds with ``backend`` lies in another kind of memory than ``target``'s
    (host memory for a GPU engine, or the reverse)."""
    kind = {"cpu": "cpu", "cuda": "cuda"}.get(backend)
    return kind is not None and kind != target.type


def _elsewhere(att, target: torch.device) -> str:
    """Why the attached tensors are not on the engine's device ``target`` ('' where they are): another kind
    of memory, or another GPU than the engine rank's."""
    device = next((att[n].device for n in att), None)
    if device is None:
        return ""
    if device.type != target.type:
        memory = "host" if device.type == "cpu" else "device"
        return f"the daemon holds it on {device} ({memory} memory), the engine's model is on {target}"
    if device.type == "cuda" and device.index is not None:
        want = target.index if target.index is not None else torch.cuda.current_device()
        if device.index != want:
            return f"the daemon's tensors are mapped on cuda:{device.index}, the engine's model is on cuda:{want}"
    return ""


def _rank_names(client, ref: str, rank: int, listed=None) -> tuple[list[str], pb.ModelVersionInfo | None]:
    """The names of ``ref``'s tensors on ``rank`` and its version's listing, for the version a load would
    attach: a lease held for as long as one answer, whose handles are never redeemed (nothing is mapped).
    ``listed``: a listing taken before the lease, used when it holds the granted version."""
    from hotweights.attach import LeaseStream

    try:
        lease = LeaseStream(client.stub, ref, f"vllm-probe:{os.getpid()}", None, rank=rank)
    except errors.NotFound:
        return [], None
    try:
        g = lease.granted
        h = g.handles
        names = list(h.table.name) if h.HasField("table") else [t.name for t in h.tensors]
        info = client.listed_version(g.name, g.version, listed)  # under the lease, where it lists again
    finally:
        lease.release()
    return names, info


def _quantized(config: dict, model_config: ModelConfig) -> bool:
    """The checkpoint is quantized, or the engine quantizes it as it loads: either way vLLM's post-processing
    writes the weights in place."""
    return bool(config.get("quantization_config")) or model_config.quantization is not None


def _copies(engine_layout: bool, config: dict, model_config: ModelConfig, target: torch.device) -> bool:
    """Whether mode auto copies the weights into the engine: where they are not in vLLM's layout, or where
    the engine writes them after loading (quantized weights; experts its MoE kernels rewrite on ``target``).
    The memory report and the load both ask this, so the KV budget counts what the load then does."""
    return not engine_layout or _quantized(config, model_config) or _experts_rewritten(config, target)


def _bind_params_copy_buffers(model: nn.Module, named: dict, att) -> dict:
    """``named`` less the module's buffers, which are copied into the engine's own: a buffer is the
    engine's state, which it may write (a checkpoint saved by vLLM's save_sharded_state holds the
    attention's KV-cache scales, which the engine updates in place), and the daemon's memory is
    read-only. What is left is bound."""
    held = _held_buffers(model, named, att)
    with torch.no_grad():
        for dst, src in held.values():
            dst.copy_(src)
    return named


def _held_buffers(model: nn.Module, named: dict, att, cast: bool = False) -> dict:
    """Takes the module's buffers out of ``named``, checked against the module's: name -> (the module's
    buffer, the attached tensor), for the caller to copy."""
    buffers = dict(model.named_buffers())
    held = {n: named.pop(n) for n in list(named) if n in buffers}
    wrong = _differs(held, buffers, cast=cast)
    if wrong:
        raise errors.BindError(
            f"cannot fill the buffers of {type(model).__name__} from {att.key} rank {att.rank}: " + "; ".join(wrong),
            wrong_shape=wrong,
        )
    return {n: (buffers[n], t) for n, t in held.items()}


# Parameters a quantized vLLM attention layer registers for KV-cache scales; a checkpoint without
# calibration does not hold them, and vLLM's own loader then leaves them at the engine's defaults.
_KV_CACHE_SCALES = re.compile(r"\.attn\.(q|k|v|prob)_(scale|zero_point)$")

# Dtypes copy mode converts between as it copies (vLLM's own loader casts an fp32 checkpoint to the
# engine's bf16 alike); quantized formats are never converted.
_CASTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _differs(sources: dict, targets: dict, cast: bool = False) -> list[str]:
    """Each of ``sources`` whose shape or dtype is not its namesake's in ``targets``, both sides named;
    with ``cast``, plain floating dtypes may differ (the copy converts)."""

    def same_dtype(a: torch.dtype, b: torch.dtype) -> bool:
        return a == b or (cast and a in _CASTS and b in _CASTS)

    return [
        f"{n}: attached {tuple(sources[n].shape)} {sources[n].dtype}, engine wants "
        f"{tuple(targets[n].shape)} {targets[n].dtype}"
        for n in sorted(sources)
        if tuple(sources[n].shape) != tuple(targets[n].shape) or not same_dtype(sources[n].dtype, targets[n].dtype)
    ]


def _copy_checked(model, params: dict, sources: dict, extra: list[str], att, build=None) -> None:
    """Checks ``sources`` (the tensors, or their shapes and dtypes on meta where ``build`` makes each) against
    ``params``, all of them before anything is copied; then copies one parameter at a time."""
    missing = sorted(n for n in set(params) - set(sources) if not _KV_CACHE_SCALES.search(n))
    wrong = _differs(sources, params, cast=True)
    if missing or wrong or extra:
        lines = [f"cannot fill {type(model).__name__} from {att.key} rank {att.rank}"]
        for title, items in (
            ("shape or dtype differs", wrong),
            ("missing from the attachment", missing),
            ("not in the engine's model", extra),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {i}" for i in items)
        raise errors.BindError("\n".join(lines), missing=missing, unexpected=extra, wrong_shape=wrong)
    with torch.no_grad():
        for name, src in sources.items():
            if build is not None:
                src = build(name)
            params[name].data.copy_(src)
            del src  # the built tensor goes before the next one is made


# --- checks ----------------------------------------------------------------------------------------


def _layout_names(model: nn.Module) -> dict[str, str]:
    """The layout's name of each of ``model``'s tensors -> the model's own name for it.

    The layout names a fused MoE layer's weights ``experts.w13_weight``/``w2_weight``, as vLLM's
    checkpoints of it do; vLLM 0.32's module holds them one level down (``experts.routed_experts.``).
    A name the model holds itself is never renamed onto.
    """
    own = list(model.state_dict(keep_vars=True))
    out = {n: n for n in own}
    for n in own:
        short = _ROUTED.sub(r".experts.\1", n)
        if short != n and short not in out:
            out[short] = n
    return out


_ROUTED = re.compile(r"\.experts\.routed_experts\.(w13_weight|w2_weight)$")


def _as_named_by(model: nn.Module, tensors, held: dict[str, str] | None = None) -> dict:
    """``tensors`` (a name -> tensor mapping in the layout's names) under the names ``model`` gives them;
    ``held`` is ``_layout_names(model)`` where the caller has it already."""
    held = _layout_names(model) if held is None else held
    return {held.get(n, n): tensors[n] for n in tensors}


class _Renamed(Mapping[str, torch.Tensor]):
    """The attached tensors ``bind`` reads, under the model's names, carrying the facts of the attachment
    they come from: its errors then name the version, the rank and each tensor's dtype as saved."""

    def __init__(self, tensors: dict[str, torch.Tensor], att, held: dict[str, str]) -> None:
        self._tensors, self._att, self._held = tensors, att, held  # held: _layout_names of the model
        self.key, self.rank = att.key, att.rank

    @functools.cached_property
    def meta(self) -> dict:
        saved = getattr(self._att, "meta", None) or {}
        named = {self._held.get(n, n): m for n, m in saved.items()}
        return {n: m for n, m in named.items() if n in self._tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _experts_rewritten(config: dict, device: torch.device) -> bool:
    """Whether vLLM's fused MoE kernels on ``device`` rewrite a MoE model's experts in place after
    loading, so that they cannot be the daemon's (read-only, shared) memory. Where they read them as
    they are (Triton on CUDA before Blackwell) or take copies of their own (the CPU kernels), binding
    is safe; Blackwell's default kernels reorder them in place and ROCm's shuffle or pad them."""
    if not config.get("num_local_experts") or device.type != "cuda":
        return False
    if getattr(torch.version, "hip", None):
        return True
    return torch.cuda.get_device_capability(device)[0] >= 10


def _check_world(att, tp: int) -> None:
    engine_layout = _in_engine_layout(att)
    if att.world_size == tp or (att.world_size == 1 and not engine_layout):
        return
    if att.world_size == 1:
        what = (
            f"{att.key} is in vLLM's layout for one rank, but the engine runs tensor_parallel_size={tp}: split "
            f"the checkpoint (hotweights shard SRC OUT --tp {tp}) and load OUT with --layout vllm"
        )
    else:
        what = (
            f"{att.key} is split for tensor parallelism tp={att.world_size}, "
            f"but the engine runs tensor_parallel_size={tp}"
        )
    raise errors.BindError(
        what,
        tp_attached=att.world_size,
        tp_wanted=tp,
    )


def _check_config(att, config: dict | None, model_config: ModelConfig, copy: bool = False) -> None:
    """The version against the engine: architecture, quantization and dtype, both sides named. ``copy``: the
    weights are copied, which converts plain floating dtypes (an fp32 checkpoint into a bf16 engine)."""
    problems = []
    engine_archs = list(getattr(model_config.hf_config, "architectures", None) or [])
    if _quantizes_online(model_config):
        raise errors.InvalidArgument(
            f"{att.key}: the engine quantizes its weights as it loads them (quantization="
            f"{model_config.quantization!r}, an unquantized model directory); load format {LOAD_FORMAT!r} does not "
            f"support online quantization (vLLM's own loader creates those weights on the meta device and "
            f"quantizes them in its weight loaders). Serve a quantized checkpoint (hotweights shard SRC OUT "
            f"--quantize fp8, then load OUT) with the engine's quantization unset, or leave it unset to serve "
            f"the weights as they are",
            quantization=str(model_config.quantization),
        )
    if config is not None:
        archs = list(config.get("architectures") or [])
        if archs and engine_archs and archs != engine_archs:
            problems.append(f"architecture: checkpoint {archs}, engine {engine_archs}")
        held, wanted = _quantization(config.get("quantization_config")), _engine_quantization(model_config)
        if not _same_quantization(held, wanted):
            # alone, before the per-tensor comparison: every linear layer would differ, with no word why
            problems.append(f"quantization: checkpoint {_said(held)}, engine {_said(wanted)}")
            raise errors.BindError(
                f"{att.key} does not fit the engine's model: " + "; ".join(problems), problems=problems
            )
    floating = {att[n].dtype for n in att if att[n].is_floating_point() and not _SKIPPED.search(n)}
    castable = copy and model_config.dtype in _CASTS and floating <= set(_CASTS)
    if floating and model_config.dtype not in floating and not castable:
        names = ", ".join(sorted(str(d) for d in floating))
        why = (
            ""
            if copy
            else " (zero copy cannot convert: use mode='copy', or serve the engine at the checkpoint's dtype)"
        )
        problems.append(f"dtype: checkpoint {names}, engine {model_config.dtype}{why}")
    if problems:
        raise errors.BindError(f"{att.key} does not fit the engine's model: " + "; ".join(problems), problems=problems)


def _quantization(qc) -> tuple[str, ...] | None:
    """What a ``quantization_config`` says of the weights' format: method, format and weight strategy."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    if not qc:
        return None
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    strategies = sorted({str(g["weights"].get("strategy") or "") for g in groups if isinstance(g.get("weights"), dict)})
    said = (str(qc.get("quant_method") or "unknown method"), str(qc.get("format") or ""), *strategies)
    return tuple(x for x in said if x)


def _engine_quantization(model_config: ModelConfig) -> tuple[str, ...] | None:
    """The engine's side: its model directory's ``quantization_config``, else the method it was given."""
    held = _quantization(getattr(model_config.hf_config, "quantization_config", None))
    if held is None and model_config.quantization is not None:
        return (str(model_config.quantization),)
    return held


def _quantizes_online(model_config: ModelConfig) -> bool:
    """The engine quantizes unquantized weights as it loads them (``quantization=...`` given, its model
    directory unquantized), which the plugin refuses: vLLM's online methods make those weights on meta."""
    return model_config.quantization is not None and not getattr(model_config.hf_config, "quantization_config", None)


def _same_quantization(held, wanted) -> bool:
    if held is not None and wanted is not None and len(wanted) == 1:
        return held[0] == wanted[0]  # the engine names only a method: the checkpoint's details are its own
    return held == wanted


def _said(q: tuple[str, ...] | None) -> str:
    return f"quantized ({', '.join(q)})" if q else "unquantized"


def _version_info(listed, ref: str):
    """The version ``ref`` (a name, ``name@version`` or an alias) names in a listing, or None."""
    target = ref
    for a in listed.aliases:
        if a.alias == ref:
            target = f"{a.name}@{a.version}"
    name, _, version = target.partition("@")
    found = [v for v in listed.versions if v.name == name and (not version or v.version == version)]
    # A bare NAME resolves as the daemon resolves it for the attach: its newest READY version that is not
    # retiring, so that what this reports (the bytes it keeps) is about the version the engine binds.
    live = [v for v in found if v.state == pb.ModelState.Value("READY") and not v.retired]
    return max(live or found, key=lambda v: v.created_unix) if found else None


def _find_config(client, att, listed=None) -> dict | None:
    """config.json beside the attached version's checkpoint; from ``listed`` where it holds the version."""
    info = client.listed_version(att.name, att.version, listed)
    return None if info is None else sources.config_of(info.source)


def _checkpoint_config(client, att) -> dict:
    config = _find_config(client, att)
    if config is None:
        raise errors.InvalidArgument(f"{att.key}: no config.json beside its checkpoint")
    return config
