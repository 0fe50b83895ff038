"""vLLM's parameter layout for Llama-family and Mixtral checkpoints, as data: which Hugging Face tensors make which
vLLM parameter of a tensor-parallel rank, and how.

The layout itself (which tensors fuse, how a rank's part is cut, the vocabulary padding) is described in
``hotweights.format.engine_layout``; this module builds its tensors with torch.

``python -m hotweights.vllm_layout SRC OUT --tp N`` writes a checkpoint in that layout
(``model-rank-R-part-0.safetensors`` plus config.json and the tokenizer files): loaded into the daemon,
each rank's tensors carry vLLM's names and shapes, so the vLLM plugin binds them without a copy.
The same recipe fills engine-owned parameters in the plugin's copy mode. Nothing here imports vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from hotweights.errors import (
    BadCheckpoint,
    HotweightsError,
    InvalidArgument,
    NotFound,
    shorten,
)
from hotweights.format import engine_layout
from hotweights.format.checkpoint import SERVING_FILES, open_checkpoint
from hotweights.sources import ENGINE_LAYOUT_MARKER
from hotweights.staging import check_output, fsync, sigterm_unwinds, staged

# The recipe (names, splits, padding) is data shared with the daemon, which applies it at load time.
Shape = engine_layout.Shape
engine_names = engine_layout.engine_names
ARCHITECTURES = engine_layout.ARCHITECTURES
VOCAB_PADDING = engine_layout.VOCAB_PADDING
_QKV, _GATE_UP, _ROW, _VOCAB = engine_layout.QKV, engine_layout.GATE_UP, engine_layout.ROW_SPLIT, engine_layout.VOCAB


def rank_tensor(name: str, t: torch.Tensor, shape: Shape, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of the unsplit Hugging Face tensor ``name`` (a view where no padding is needed)."""
    tp = shape.tp
    m = _QKV.match(name)
    if m:
        if m.group(2) == "q":
            per = shape.heads // tp * shape.head_dim
            return t.narrow(0, rank * per, per)
        first, count = shape.kv_range(rank)
        return t.narrow(0, first * shape.head_dim, count * shape.head_dim)
    e = engine_layout.EXPERT.match(name)
    if _GATE_UP.match(name) or (e and e.group(3) != "w2"):
        per = t.shape[0] // tp
        return t.narrow(0, rank * per, per)
    if e:
        per = t.shape[1] // tp
        return t.narrow(1, rank * per, per)
    m = _ROW.match(name)
    if m:
        if m.group(2) == "bias":
            return t
        per = t.shape[1] // tp
        return t.narrow(1, rank * per, per)
    if name in _VOCAB:
        per = shape.padded_vocab // tp
        lo, hi = rank * per, min((rank + 1) * per, shape.vocab)
        rows = t.narrow(0, lo, max(hi - lo, 0))
        if rows.shape[0] == per:
            return rows
        out = torch.zeros((per,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        out[: rows.shape[0]] = rows
        return out
    return t


def build_rank(
    get: Callable[[str], torch.Tensor],
    names: Iterable[str],
    config: dict,
    tp: int,
    rank: int,
    only: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """vLLM name -> rank ``rank``'s tensor, made from unsplit Hugging Face tensors read through ``get``.

    ``only`` limits the result to those vLLM names (the plugin asks for one parameter at a time).
    """
    shape = Shape(config, tp)
    plan = engine_names(names)
    if shape.tied:
        plan.pop("lm_head.weight", None)  # vLLM ties lm_head to embed_tokens: one parameter
    wanted = plan if only is None else {k: plan[k] for k in only if k in plan}
    out = {}
    for fused, parts in wanted.items():
        pieces = [rank_tensor(p, get(p), shape, rank) for p in parts]
        out[fused] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
        if engine_layout.EXPERT.match(parts[0]):  # stacked per expert: [E, rows, cols]
            out[fused] = out[fused].view(shape.experts, -1, out[fused].shape[-1])
    return out


def convert(src: Path, out: Path, tp: int) -> list[Path]:
    """Writes ``model-rank-R-part-0.safetensors`` for each rank in vLLM's layout, plus the aux files.

    All-or-nothing as seen from ``out`` (a new or empty directory): everything is written and fsynced
    in a hidden staging directory beside it, renamed into place at the end; a failure or an interrupt
    removes it, so ``out`` never holds some ranks' files that a loader would take for a whole smaller
    checkpoint. The source's tensors are the ones ``open_checkpoint`` reads (the files its
    ``model.safetensors.index.json`` names, when it has one). Returns the paths under ``out``.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise InvalidArgument(f"--tp must be a positive integer, not {tp!r}")
    config = _read_config(src)
    engine_layout.check_quantization(config)  # per-tensor FP8 and other schemes: refused, naming them
    shape = Shape(config, tp)  # architecture, heads and vocabulary against tp, before anything is written
    check_output(src, out, "the converter")
    where = _source_tensors(src)
    if shape.tied:
        where.pop("lm_head.weight", None)
    with staged(out, "vllm-layout") as stage:
        _write(src, stage, config, tp, where)
    return [out / f"model-rank-{rank}-part-0.safetensors" for rank in range(tp)]


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{path}: no config.json (the layout is read from it)", path=str(path)) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise BadCheckpoint(f"{path}: cannot read it as JSON: {exc}", path=str(path)) from None
    if not isinstance(config, dict):
        raise BadCheckpoint(f"{path}: not a JSON object", path=str(path))
    return config


def _source_tensors(src: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it, for the files hotweights' own reader takes as the checkpoint."""
    with open_checkpoint(src) as ckpt:
        if ckpt.world_size > 1:
            raise InvalidArgument(
                f"{src}: already split into {ckpt.world_size} ranks; convert the original Hugging Face model "
                f"(or a tp-1 shard of it)",
                path=str(src),
            )
        where = {t.name: f.path for f in ckpt.ranks[0].files for t in f.tensors}
    for name, file in where.items():
        if not (name.startswith("model.") or name == "lm_head.weight"):
            # vLLM's Llama-family and Mixtral loaders take Hugging Face names only: anything else (another
            # format's copy of the weights) would be copied whole into every rank
            raise InvalidArgument(
                f"{file}: tensor {shorten(name)!r} is not a Hugging Face Llama-family or Mixtral tensor, "
                f"which vLLM's layout has no rule for",
                path=str(file),
                tensor=shorten(name),
            )
    return where


def _write(src: Path, staging: Path, config: dict, tp: int, where: dict[str, Path]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in sorted(set(where.values()))}
        for rank in range(tp):
            tensors = build_rank(lambda n: handles[where[n]].get_tensor(n), list(where), config, tp, rank)
            path = staging / f"model-rank-{rank}-part-0.safetensors"
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
            except Exception as exc:
                if type(exc).__name__ != "SafetensorError":  # the writer's own error type, for a failed write
                    raise
                raise _as_os_error(exc) from None
            fsync(path)
    for name in SERVING_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, staging / name)
            fsync(staging / name)
    layout = {"engine": "vllm", "tp": tp, "vocab_padding": VOCAB_PADDING, "source": str(src.resolve())}
    (staging / ENGINE_LAYOUT_MARKER).write_text(json.dumps(layout, indent=1) + "\n")
    fsync(staging / ENGINE_LAYOUT_MARKER)


def _as_os_error(exc: BaseException) -> OSError:
    text = str(exc)
    code = errno.ENOSPC if "No space left" in text else errno.EDQUOT if "quota" in text.lower() else errno.EIO
    return OSError(code, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hotweights.vllm_layout",
        description="Write a Hugging Face Llama-family or Mixtral checkpoint in vLLM's per-rank layout.",
    )
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args(argv)
    # SIGTERM (a batch job's stop) unwinds like Ctrl-C, so the staging directory is removed either way,
    # and then ends the process as SIGTERM does, as `hotweights shard` does.
    try:
        with sigterm_unwinds(lambda: print("terminated: nothing was written", file=sys.stderr)):
            paths = convert(args.src, args.out, args.tp)
    except (HotweightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
