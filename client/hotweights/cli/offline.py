"""Stage 1 commands: ``hotweights shard``, ``hotweights verify`` and ``hotweights plan``.

They work on files alone (no daemon). ``register`` adds them to the main typer app.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from hotweights.errors import HotweightsError
from hotweights.units import format_size, parse_size


def _fail(err: Exception) -> None:
    typer.echo(f"hotweights: {err}", err=True)
    raise typer.Exit(1)


def shard(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors)"),
    out: Path = typer.Argument(..., help="output directory: new or empty"),
    tp: int = typer.Option(..., "--tp", help="tensor-parallel size"),
    quantize: str | None = typer.Option(None, "--quantize", help="fp8: E4M3 linear weights with float32 scales"),
    fp8_scale: str = typer.Option("channel", "--fp8-scale", help="channel (per output channel) | tensor"),
    parts_per_rank: int | None = typer.Option(None, "--parts-per-rank", help="files per rank"),
    max_part_size: str | None = typer.Option(None, "--max-part-size", help="largest file, e.g. 5GB (default)"),
    rules: Path | None = typer.Option(
        None, "--rules", help='TOML/JSON: tensor name pattern -> split dim or "replicate" (overrides built-in rules)'
    ),
    workers: int | None = typer.Option(None, "--workers", help="tensors processed at once"),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="default: on a terminal"),
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Split a checkpoint for tensor parallelism into model-rank-R-part-P.safetensors + hotweights.json."""
    from hotweights.tools.shard import shard_checkpoint

    try:
        result = shard_checkpoint(
            src,
            out,
            tp,
            quantize=quantize,
            fp8_scale=fp8_scale,
            parts_per_rank=parts_per_rank,
            max_part_size=parse_size(max_part_size) if max_part_size is not None else None,
            rules_file=rules,
            workers=workers,
            progress=sys.stderr.isatty() if progress is None else progress,
        )
    except HotweightsError as exc:
        _fail(exc)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "out": str(result.out),
                    "tp": result.tp,
                    "files": result.files,
                    "bytes": result.bytes_written,
                    "seconds": round(result.seconds, 3),
                },
                indent=2,
            )
        )
        return
    typer.echo(
        f"wrote {len(result.files)} files ({format_size(result.bytes_written)}) for tp {result.tp} "
        f"to {result.out} in {result.seconds:.1f} s"
    )


def verify(
    directory: Path = typer.Argument(..., help="a directory written by hotweights shard"),
    full: bool = typer.Option(False, "--full", help="hash every byte (default: sizes and headers only)"),
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Check a sharded checkpoint against its hotweights.json."""
    from hotweights.format.manifest import load_manifest, verify_checkpoint

    level = "full" if full else "fast"
    try:
        if load_manifest(directory) is None:
            _no_manifest(directory)
        verify_checkpoint(directory, level)
    except HotweightsError as exc:
        if json_out:
            typer.echo(
                json.dumps(
                    {
                        "ok": False,
                        "level": level,
                        "error": type(exc).__name__,
                        "message": str(exc),
                        **{k: v for k, v in exc.details.items() if isinstance(v, (str, int))},
                    }
                )
            )
            raise typer.Exit(1) from None
        _fail(exc)
    if json_out:
        typer.echo(json.dumps({"ok": True, "level": level, "path": str(directory)}))
    else:
        typer.echo(f"{directory}: ok ({'every byte hashed' if full else 'layout, sizes and headers'})")


def _no_manifest(directory: Path) -> None:
    from hotweights.errors import FailedPrecondition, NotFound

    if not directory.exists():
        raise NotFound(f"{directory}: no such file or directory", path=str(directory))
    raise FailedPrecondition(
        f"{directory}: no hotweights.json: nothing to verify against (was it written by `hotweights shard`?)",
        path=str(directory),
    )


def plan(
    model: Path = typer.Argument(..., help="model directory, sharded directory, or config.json"),
    tp: int | None = typer.Option(None, "--tp", help="tensor-parallel size (default: a manifest's)"),
    gpu_memory: str = typer.Option(..., "--gpu-memory", help="memory per GPU with its unit, e.g. 141GB or 80GiB"),
    weights: str | None = typer.Option(
        None, "--weights", help="bf16 | fp16 | fp32 | fp8 | int4 | mxfp4 | nvfp4 (default: the model's own)"
    ),
    kv_dtype: list[str] | None = typer.Option(
        None, "--kv-dtype", help="KV cache dtype (fp16, bf16, fp8, int8, int4, ...); repeat for more rows"
    ),
    kv_bits: list[float] | None = typer.Option(
        None, "--kv-bits", help="KV bits per element (e.g. 4, 3 for KV quantizers); repeat for more rows"
    ),
    reserve: str = typer.Option("5GB", "--reserve", help="kept free per GPU (CUDA context, activations)"),
    max_context: int | None = typer.Option(None, "--max-context", help="default: max_position_embeddings"),
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Per GPU: weight bytes, free bytes, KV bytes per token and token capacity for each KV option.

    Exits 1 when the weights and the reserve do not fit in --gpu-memory."""
    from hotweights.tools.capacity import format_plan
    from hotweights.tools.capacity import plan as make_plan

    options = [*(kv_dtype or []), *(f"{b:g}" for b in (kv_bits or []))]
    try:
        result = make_plan(
            model,
            tp,
            size_with_unit("--gpu-memory", gpu_memory),
            weights=weights,
            kv=options or None,
            reserve=size_with_unit("--reserve", reserve),
            max_context=max_context,
        )
    except HotweightsError as exc:
        _fail(exc)
    typer.echo(json.dumps(result.to_json(), indent=2) if json_out else format_plan(result))
    if not result.fits:
        typer.echo(f"hotweights: {model} {result.notes[0]}", err=True)
        raise typer.Exit(1)


_BARE_NUMBER = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*$")


def size_with_unit(option: str, text: str) -> int:
    """A size that names its unit: a bare ``141`` is refused, not read as 141 bytes (0 needs none)."""
    from hotweights.errors import InvalidArgument

    if _BARE_NUMBER.match(text) and float(text) != 0:
        raise InvalidArgument(
            f"{option} {text.strip()}: give a unit, e.g. {text.strip()}GB or {text.strip()}GiB "
            f"(a bare number would be read as bytes)"
        )
    return parse_size(text)


def register(app: typer.Typer) -> None:
    app.command("shard")(shard)
    app.command("verify")(verify)
    app.command("plan")(plan)
