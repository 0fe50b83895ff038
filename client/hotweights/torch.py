"""Binding a ``torch.nn.Module`` to attached weights: the module's parameters become the daemon's memory.

    import hotweights, hotweights.torch as hwt

    with hwt.skeleton(dtype=torch.bfloat16):
        model = MyModel(config)            # parameters on meta: nothing big is allocated or initialised
    att = hotweights.connect().attach("llama-8b")
    hwt.bind(model, att)                    # every parameter now aliases the attachment, zero copy

Bound parameters are read-only in fact, not only by convention: on the cpu backend the attachment is
a read-only shared mapping, so an in-place write to a bound parameter (``p.add_(1)``, an optimizer
step, ``load_state_dict`` into the module) kills the process with SIGSEGV; on the cuda backend the
mapping is read-only on the device, so such a write is an illegal-address CUDA error (an attach fails
where the driver cannot map read-only; versions loaded with ``allocation="legacy_ipc"`` and clients
with ``HOTWEIGHTS_CUDA_WRITABLE=1`` are mapped writable, and there a write changes every reader's weights). torch has no
read-only tensor flag to turn this into a Python exception without slowing every operation, so
``bind`` sets ``requires_grad=False`` and callers must treat the module as inference-only.
Copy a parameter first (``p.clone()``) to change it.

The attachment's lease must outlive every use of the bound parameters: while it is held the daemon
never frees the memory they point at. ``bind`` given a ``hotweights`` attachment keeps it alive
as long as the module (``attachments_of(module)`` lists them), so the one-liner
``hwt.bind(model, client.attach(...))`` holds its lease as long as the model lives; ``release()`` on
the attachment still ends it at once. Binding the module again lets go of every attachment it no longer
uses (a rebind to a new version ends the old version's lease once nothing else holds it). The reference
is kept beside the module, not in it: ``copy.deepcopy`` and ``torch.save`` see a plain module. The
client that made the attachment must stay open as well (see ``Client.close``).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from hotweights.errors import BindError

__all__ = ["BindReport", "attachments_of", "bind", "skeleton"]

_SKELETON_LOCK = threading.RLock()


@contextlib.contextmanager
def skeleton(dtype: torch.dtype | None = None) -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers for real, on the CPU.

    Buffers are computed by the module's own constructor (rotary ``inv_freq``, causal masks, position
    ids), so they equal what a normal construction gives; parameters hold no memory until ``bind``
    points them at attached tensors. ``dtype`` is the default floating dtype while building (the
    dtype the parameters get, as ``from_pretrained(dtype=...)`` does); code that names a dtype
    explicitly keeps it (transformers' rotary embeddings stay float32).

    A parameter's constructor may still create its initial tensor on the CPU before it is registered
    (``nn.Linear`` calls ``torch.empty``): that memory is never touched, it becomes meta at once and
    initialisers (``reset_parameters``) then run on meta, so nothing is written or kept resident.

    This patches ``nn.Module.register_parameter`` for the duration, process-wide: other threads that
    build modules meanwhile get meta parameters too, so do not build models concurrently.
    """
    with _SKELETON_LOCK:
        original = torch.nn.Module.register_parameter

        def register_parameter(self, name, param):
            if param is not None and param.device.type != "meta":
                # keep the parameter's class and attributes; only its storage moves to meta
                moved = _same_kind(param, param.to("meta"))
                moved.requires_grad_(param.requires_grad)
                # One attribute dict for both: engines set attributes on the object they created after
                # registering it (vLLM's set_weight_attrs), and those must reach the registered one.
                moved.__dict__ = param.__dict__
                # Initialisers that honour this flag (transformers') skip the parameter: on meta they write
                # nothing, yet each call costs about a millisecond, over a thousand of them in a large model.
                moved._is_hf_initialized = True
                param = moved
            original(self, name, param)

        old_dtype = torch.get_default_dtype()
        setattr(torch.nn.Module, "register_parameter", register_parameter)  # noqa: B010 (mypy: no method-assign)
        try:
            if dtype is not None:
                torch.set_default_dtype(dtype)
            yield
        finally:
            setattr(torch.nn.Module, "register_parameter", original)  # noqa: B010
            torch.set_default_dtype(old_dtype)


def _same_kind(param: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
    """A parameter of ``param``'s own class and attributes over ``data`` (no copy, no ``__init__`` call).

    Engines subclass Parameter and hang loading hooks on it (vLLM's ``weight_loader``,
    ``output_dim``): calling the subclass's constructor would need its private arguments.
    """
    new = torch.Tensor._make_subclass(type(param), data, False)
    new.__dict__.update(param.__dict__)
    return new


@dataclass
class BindReport:
    """What ``bind`` did: names bound, tied names that share one tensor, and the bytes they alias."""

    bound: dict[str, str] = field(default_factory=dict)  # module name -> attachment name
    tied: dict[str, str] = field(default_factory=dict)  # module name -> the module name it shares with
    unused: list[str] = field(default_factory=list)  # attachment names left unbound (strict=False, or ignored)
    nbytes: int = 0

    def __len__(self) -> int:
        return len(self.bound)


def bind(
    module: torch.nn.Module,
    attachment: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    prefix: str = "",
    ignore_unexpected: Callable[[str], bool] | None = None,
) -> BindReport:
    """Points every parameter of ``module`` (and every persistent buffer the attachment holds) at the
    attached tensor of the same name, without copying; sets ``requires_grad=False``.

    Names are the module's ``state_dict`` names, looked up as ``prefix + name`` in ``attachment``.
    Parameters shared between modules (an ``lm_head`` tied to ``embed_tokens``) need the tensor under
    one of their names and keep sharing it. Parameter subclasses and their attributes are kept.

    ``strict`` (the default): every parameter must be found with its exact shape and dtype, and
    every attached tensor must be used; otherwise one ``BindError`` names every missing, unexpected,
    mis-shaped and mis-typed tensor, and the module is left unchanged. With ``strict=False`` missing
    and unexpected names are allowed (reported in the result), but a shape or dtype that differs is
    still an error: binding it would compute garbage. ``ignore_unexpected`` names attached tensors
    the module knowingly does without (a buffer it computes itself that older checkpoints saved): they
    are left unbound and reported in ``unused``, never an error.

    An attachment (anything with a ``release`` method) is kept alive beside the module
    (``attachments_of``), so its lease lives as long as the module. See the module docstring: bound
    parameters must not be written.
    """
    params = _named_params(module)
    names = set(attachment)
    plan: list[tuple[list[tuple[torch.nn.Module, str, str]], str, torch.Tensor, bool]] = []
    missing, wrong_shape, wrong_dtype = [], [], []
    used: set[str] = set()
    report = BindReport()

    for owners, is_param, current in params:
        full = [n for _, _, n in owners]
        found = [n for n in full if prefix + n in names]
        if not found:
            if is_param or current.device.type == "meta":
                missing.append(" = ".join(full))
            continue  # a real buffer the checkpoint lacks is computed by the module, as from_pretrained keeps it
        key = prefix + found[0]
        # a tied tensor saved under several names: one is bound, the others are accounted for
        used.update(prefix + n for n in found)
        t = attachment[key]
        fits = True
        # every name the tied tensor is saved under must fit it, not only the one bound
        for other in (prefix + n for n in found):
            o = attachment[other]
            if tuple(o.shape) != tuple(current.shape):
                wrong_shape.append(f"{other}: attached {tuple(o.shape)}, module wants {tuple(current.shape)}")
                fits = False
            elif o.dtype != current.dtype:
                wrong_dtype.append(
                    f"{other}: attached {_dtype_name(attachment, other, o)}, module wants {current.dtype}"
                )
                fits = False
        if fits:
            plan.append((owners, key, t, is_param))

    left = sorted(names - used) if not prefix else sorted(n for n in names - used if n.startswith(prefix))
    unexpected = [n for n in left if ignore_unexpected is None or not ignore_unexpected(n)]
    problems = []
    if wrong_shape:
        problems.append(("shape differs", wrong_shape))
    if wrong_dtype:
        problems.append(("dtype differs", wrong_dtype))
    if strict:
        if missing:
            problems.append(("missing from the attachment", missing))
        if unexpected:
            problems.append(("not in the module", unexpected))
    if problems:
        raise BindError(
            _describe(module, attachment, problems),
            missing=missing,
            unexpected=unexpected if strict else [],
            wrong_shape=wrong_shape,
            wrong_dtype=wrong_dtype,
        )

    for owners, key, t, is_param in plan:
        _install(owners, t, is_param)
        first = owners[0][2]
        report.bound[first] = key
        for _, _, other in owners[1:]:
            report.tied[other] = first
        report.nbytes += t.numel() * t.element_size()
    report.unused = left
    _pin(module, attachment, {name for owners, _, _, _ in plan for _, _, name in owners})
    return report


# module -> [(attachment, the module's names bound to it)]. Weak on the module: the pins go with it. Kept
# outside the module's state so that copying or saving the module does not try to copy a live lease.
_PINS: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[object, set[str]]]] = weakref.WeakKeyDictionary()
_PINS_LOCK = threading.Lock()


def _pin(module: torch.nn.Module, attachment: object, bound: set[str]) -> None:
    """Keeps ``attachment`` (and so its lease) alive as long as ``module``: the parameters alias its memory,
    and a lease that ended with the caller's last reference would let the daemon free it under them.
    Attachments whose every bound name this bind has re-pointed are let go."""
    with _PINS_LOCK:
        kept = []
        for other, names in _PINS.get(module, []):
            if other is attachment:
                bound = bound | names
                continue
            names = names - bound
            if names:
                kept.append((other, names))
        if callable(getattr(attachment, "release", None)) and bound:
            kept.append((attachment, bound))
        if kept:
            _PINS[module] = kept
        else:
            _PINS.pop(module, None)


def attachments_of(module: torch.nn.Module) -> list:
    """The attachments ``bind`` keeps alive for ``module`` (those some of its parameters still alias)."""
    with _PINS_LOCK:
        return [a for a, _ in _PINS.get(module, [])]


def _named_params(module: torch.nn.Module):
    """[(owners, is_param, tensor)] for each distinct parameter and each persistent buffer.

    ``owners`` lists every (submodule, attribute, full name) that holds the same object, in module
    order, so a tied parameter is bound once and stays shared.
    """
    by_id: dict[int, tuple[list, bool, torch.Tensor]] = {}
    order: list[int] = []
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        base = f"{mod_name}." if mod_name else ""
        params = ((attr, p, True) for attr, p in mod._parameters.items())
        buffers = ((attr, b, False) for attr, b in mod._buffers.items() if attr not in mod._non_persistent_buffers_set)
        for attr, t, is_param in itertools.chain(params, buffers):
            if t is None:
                continue
            entry = by_id.get(id(t))
            if entry is None:
                entry = by_id[id(t)] = ([], is_param, t)
                order.append(id(t))
            if not any(o[0] is mod and o[1] == attr for o in entry[0]):
                entry[0].append((mod, attr, base + attr))
    return [by_id[i] for i in order]


def _install(owners, t: torch.Tensor, is_param: bool) -> None:
    if not is_param:
        for mod, attr, _ in owners:
            mod._buffers[attr] = t
        return
    old = owners[0][0]._parameters[owners[0][1]]
    if old.device == t.device:
        # same device: keep the very object, so anything that holds it (an optimizer, an engine's
        # parameter list) sees the bound memory
        old.data = t
        old.requires_grad_(False)
        return
    new = _same_kind(old, t)
    for mod, attr, _ in owners:
        mod._parameters[attr] = new


def _dtype_name(attachment, key: str, t: torch.Tensor) -> str:
    meta = getattr(attachment, "meta", None)
    if isinstance(meta, Mapping) and key in meta:
        return f"{meta[key].dtype} ({t.dtype})"
    return str(t.dtype)


def _describe(module: torch.nn.Module, attachment, problems) -> str:
    what = getattr(attachment, "key", None) or type(attachment).__name__
    rank = getattr(attachment, "rank", None)
    where = f"{what} rank {rank}" if rank is not None else what
    count = sum(len(items) for _, items in problems)
    lines = [f"cannot bind {type(module).__name__} to {where}: {count} tensor(s) do not match"]
    for title, items in problems:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)
