"""From source tensor headers to every output tensor of every rank, before any data is read.

The plan is complete up front (names, dtypes, shapes, which slice of which source tensor), so the
writer can lay out every output file's header first and then stream data into place, and so every
error a shard run can hit on its inputs is raised before the first byte is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hotweights.errors import BadCheckpoint, InvalidArgument
from hotweights.format.dtypes import DTYPES, nbytes_for
from hotweights.tools.shard import quantize as fp8
from hotweights.tools.shard.model_config import ModelConfig, check_tp, divisors
from hotweights.tools.shard.prequant import Companion, SourceFormat, source_format
from hotweights.tools.shard.rules import ARCHITECTURES, Rule, RuleSet

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]
    file: Path | None = None  # None in plans made from shapes alone (planning, tests)
    begin: int = 0  # absolute byte offsets in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        return nbytes_for(DTYPES[self.dtype], self.shape)


@dataclass(frozen=True)
class Split:
    """This rank's piece: number ``index`` of ``of`` equal pieces along ``dim``.

    ``of`` is less than tp where a unit is replicated (KV heads when num_key_value_heads < tp):
    ranks ``index * tp/of .. (index+1) * tp/of - 1`` then hold the same piece.
    """

    dim: int
    index: int
    of: int

    def to_json(self) -> dict[str, int]:
        return {"dim": self.dim, "index": self.index, "of": self.of}


@dataclass
class OutTensor:
    name: str
    rank: int
    dtype: str
    shape: tuple[int, ...]
    split: Split | None  # None: the whole tensor, replicated on every rank
    kind: str = "data"  # "data": bytes of the source (maybe quantized); "scale": made here
    quantization: dict | None = None  # for the manifest
    file: str = ""  # filled in when parts are laid out
    begin: int = 0  # offset in the file's data section

    @property
    def nbytes(self) -> int:
        return nbytes_for(DTYPES[self.dtype], self.shape)


@dataclass
class Job:
    """One source tensor: read once, maybe quantized, its pieces written to every rank."""

    source: SourceTensor
    quantize: str | None  # FP8 granularity, or None to copy bytes
    outputs: list[OutTensor] = field(default_factory=list)


@dataclass
class ShardPlan:
    config: ModelConfig
    tp: int
    jobs: list[Job]
    quantize: str | None
    source_format: SourceFormat | None
    tied_embeddings: bool
    ignored_modules: list[str]  # linear modules left unquantized under --quantize

    def rank_outputs(self, rank: int) -> list[OutTensor]:
        return [o for j in self.jobs for o in j.outputs if o.rank == rank]


def plan_shards(
    tensors: list[SourceTensor],
    config: ModelConfig,
    tp: int,
    rules: RuleSet,
    quantize: str | None = None,
) -> ShardPlan:
    check_tp(tp)
    if quantize is not None and quantize not in fp8.GRANULARITIES:
        raise InvalidArgument(f"FP8 scales must be per {' or per '.join(fp8.GRANULARITIES)}, not {quantize!r}")
    fmt = source_format(config.quantization_config)
    if quantize and fmt is not None:
        raise InvalidArgument(
            f"source is already quantized ({fmt.method}); --quantize fp8 takes a floating-point source",
            quant_method=fmt.method,
        )
    by_name = {t.name: t for t in tensors}
    placer = _Placer(config, tp, by_name)

    uncovered = []
    resolved: list[tuple[SourceTensor, Rule, Companion | None]] = []
    for t in tensors:
        rule = rules.match(t.name)
        if rule is not None:
            resolved.append((t, rule, None))
            continue
        # A quantized source's scales and packed words follow the rule of the weight they belong to.
        probe = fmt.companion(t.name, t.shape, None) if fmt is not None else None
        base_rule = rules.match(probe.base) if probe is not None else None
        if fmt is not None and base_rule is not None:
            resolved.append((t, base_rule, fmt.companion(t.name, t.shape, base_rule.split_dim)))
            continue
        uncovered.append(t.name)
    if uncovered:
        shown = ", ".join(repr(n) for n in uncovered[:5])
        more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
        arch = rules.architecture or "unknown architecture"
        raise InvalidArgument(
            f"no tensor-parallel rule covers tensor {shown}{more} ({arch}); hotweights never replicates a tensor "
            f'silently: pass --rules FILE mapping it to a split dim or "replicate"',
            tensors=uncovered,
        )

    if tp > 1:
        # Model-wide divisibility first, in a fixed order, so the error names the most basic problem.
        used = {rule.unit for _, rule, _ in resolved if rule.split_dim is not None}
        for unit in ("heads", "kv_heads", "vocab"):
            if unit in used:
                placer.pieces(unit)

    jobs: list[Job] = []
    ignored: list[str] = []
    for t, rule, comp in resolved:
        if comp is not None:
            splits = placer.companion_splits(t, rule, comp)
            jobs.append(Job(t, None, _outputs(t.name, t.dtype, t.shape, splits)))
            continue
        splits = placer.splits(t, rule)
        if quantize and rule.quantize:
            fp8.check_quantizable(t.name, t.dtype, t.shape)
            sname = fp8.scale_name(t.name)
            if sname in by_name:
                raise InvalidArgument(
                    f"source already holds {sname!r}: it looks quantized; --quantize fp8 takes a floating-point source",
                    tensor=sname,
                )
            qinfo = {"method": "fp8", "dtype": "F8_E4M3", "granularity": quantize, "scale": sname}
            outs = _outputs(t.name, "F8_E4M3", t.shape, splits, quantization=qinfo)
            sshape = fp8.scale_shape(t.shape, quantize)
            # Per-channel scales follow the weight's rows: split with a column-parallel weight, whole otherwise.
            s_splits = [s if (s is not None and s.dim == 0 and quantize == "channel") else None for s in splits]
            outs += _outputs(sname, "F32", sshape, s_splits, kind="scale", quantization={"scale_of": t.name})
            jobs.append(Job(t, quantize, outs))
        else:
            if quantize and t.name.endswith(".weight") and len(t.shape) == 2 and t.name != EMBED:
                ignored.append(t.name.removesuffix(".weight"))
            jobs.append(Job(t, None, _outputs(t.name, t.dtype, t.shape, splits)))

    tied = _tied(config, by_name, rules)
    return ShardPlan(config, tp, jobs, quantize, fmt, tied, ignored)


def _outputs(
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    splits: list[Split | None],
    *,
    kind: str = "data",
    quantization: dict | None = None,
) -> list[OutTensor]:
    outs = []
    for rank, split in enumerate(splits):
        piece = list(shape)
        if split is not None:
            piece[split.dim] //= split.of
        outs.append(OutTensor(name, rank, dtype, tuple(piece), split, kind, quantization))
    return outs


def _tied(config: ModelConfig, by_name: dict[str, SourceTensor], rules: RuleSet) -> bool:
    if LM_HEAD in by_name or EMBED not in by_name:
        return False
    if config.tie_word_embeddings is False and rules.architecture in ARCHITECTURES:
        raise BadCheckpoint(
            f"config.json sets tie_word_embeddings false, but the checkpoint has no {LM_HEAD!r}", tensor=LM_HEAD
        )
    return True


class _Placer:
    """Turns a rule into one Split (or None) per rank, checking every divisibility the split needs."""

    def __init__(self, config: ModelConfig, tp: int, by_name: dict[str, SourceTensor]) -> None:
        self.config = config
        self.tp = tp
        self.by_name = by_name
        self._checked: dict[str, int] = {}

    def pieces(self, unit: str) -> int:
        """How many distinct pieces a tensor of this unit is cut into (tp, or fewer where replicated)."""
        if unit in self._checked:
            return self._checked[unit]
        cfg, tp = self.config, self.tp
        n = tp
        if unit == "heads":
            cfg.require("num_attention_heads")
            if cfg.num_attention_heads % tp:
                raise InvalidArgument(
                    f"tp {tp} does not divide num_attention_heads {cfg.num_attention_heads}: attention is split by "
                    f"whole heads (tp can be {_choices(cfg.num_attention_heads)})",
                    tp=tp,
                )
        elif unit == "kv_heads":
            kv = cfg.num_key_value_heads
            if kv % tp == 0:
                n = tp
            elif tp % kv == 0:
                n = kv  # fewer KV heads than ranks: each KV head is replicated on tp/kv ranks
            else:
                raise InvalidArgument(
                    f"tp {tp} neither divides num_key_value_heads {kv} nor is a multiple of it: KV heads are split "
                    f"whole, or replicated when there are fewer than tp",
                    tp=tp,
                )
        elif unit == "vocab":
            cfg.require("vocab_size")
            if cfg.vocab_size % tp:
                raise InvalidArgument(
                    f"tp {tp} does not divide vocab_size {cfg.vocab_size}: embeddings and lm_head are split by "
                    f"vocabulary rows and hotweights shard does not pad the vocabulary (padding would change the "
                    f"tensors; serving engines pad at load time); tp can be {_choices(cfg.vocab_size)}",
                    tp=tp,
                )
        self._checked[unit] = n
        return n

    def splits(self, t: SourceTensor, rule: Rule) -> list[Split | None]:
        if rule.split_dim is None or self.tp == 1:
            return [None] * self.tp
        dim = rule.split_dim
        if dim >= len(t.shape):
            raise InvalidArgument(
                f"tensor {t.name!r} of shape {list(t.shape)} has no dim {dim} to split "
                f"(rule {rule.pattern!r} from {rule.origin})",
                tensor=t.name,
            )
        if DTYPES[t.dtype].bits % 8:
            raise InvalidArgument(
                f"tensor {t.name!r} is {t.dtype}, packed below one byte per element: splitting "
                f"it is unsafe; replicate it with a rules file",
                tensor=t.name,
            )
        n = self.pieces(rule.unit)
        self._check_heads(t, rule, dim)
        return self._even(t.name, t.shape, dim, n, rule)

    def companion_splits(self, t: SourceTensor, rule: Rule, comp: Companion) -> list[Split | None]:
        if comp.tensor_dim is None or self.tp == 1:
            return [None] * self.tp
        n = self.pieces(rule.unit)
        if comp.block:
            base = self.by_name.get(comp.base)
            size = base.shape[rule.split_dim] if base and rule.split_dim is not None else 0
            if base is None or size % n or (size // n) % comp.block:
                raise InvalidArgument(
                    f"tensor {t.name!r}: {comp.why}; {comp.base!r} dim {rule.split_dim} of size {size} gives "
                    f"{size // n if n else 0} per rank at tp {self.tp}, not a multiple of the {comp.block} block, "
                    f"so the split is unsafe",
                    tensor=t.name,
                )
        return self._even(t.name, t.shape, comp.tensor_dim, n, rule, why=comp.why)

    def _even(
        self, name: str, shape: tuple[int, ...], dim: int, n: int, rule: Rule, why: str = ""
    ) -> list[Split | None]:
        if shape[dim] % n:
            because = f" ({why})" if why else ""
            raise InvalidArgument(
                f"tensor {name!r}: dim {dim} of size {shape[dim]} does not split into {n} equal pieces at tp "
                f"{self.tp}{because}",
                tensor=name,
                tp=self.tp,
            )
        return [Split(dim, r * n // self.tp, n) for r in range(self.tp)]

    def _check_heads(self, t: SourceTensor, rule: Rule, dim: int) -> None:
        # Equal row blocks are whole heads only if the tensor holds exactly heads x head_dim rows.
        cfg = self.config
        heads = {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads}.get(rule.unit)
        if heads and cfg.head_dim and t.shape[dim] != heads * cfg.head_dim:
            raise BadCheckpoint(
                f"tensor {t.name!r}: dim {dim} has {t.shape[dim]} entries, but config.json says {heads} "
                f"{rule.unit.replace('_', ' ')} x head_dim {cfg.head_dim} = {heads * cfg.head_dim}",
                tensor=t.name,
            )


def _choices(n: int) -> str:
    return ", ".join(str(d) for d in divisors(n, 12))
