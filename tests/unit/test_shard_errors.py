"""Bad input to ``hotweights shard`` is a typed error whose message names the problem.

Every failure here also leaves nothing under the output path that a loader could take for a
checkpoint.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_shard_roundtrip import assert_bit_equal

from hotweights.errors import BadCheckpoint, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from hotweights.tools.shard import shard_checkpoint, writer
from support.tp_forward import build_model, reassemble, source_tensors


def copy_model(tmp_path: Path, kind: str = "llama_gqa") -> Path:
    src, _ = build_model(kind)
    d = tmp_path / "src"
    shutil.copytree(src, d)
    return d


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def tiny_source(tmp_path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A hand-made source: the planner fails on headers, so the weights can be anything."""
    d = tmp_path / "hand"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file(tensors, d / "model.safetensors")
    return d


def hand_config(**changes) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 8,
        "num_hidden_layers": 1,
        **changes,
    }


def assert_nothing_published(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if ".hotweights-partial-" in p.name]
    assert leftovers == []


def test_unknown_architecture(tmp_path):
    d = copy_model(tmp_path)
    edit_config(d, architectures=["FancyNewForCausalLM"])
    with pytest.raises(InvalidArgument, match=r"unknown architecture 'FancyNewForCausalLM'.*--rules"):
        shard_checkpoint(d, tmp_path / "out", 2)
    assert_nothing_published(tmp_path / "out")


def test_tensor_without_a_rule(tmp_path):
    d = copy_model(tmp_path)
    tensors = source_tensors(d)
    tensors["model.layers.1.mlp.adapter.weight"] = torch.zeros(4, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        InvalidArgument,
        match=r"no tensor-parallel rule covers tensor 'model\.layers\.1\.mlp\.adapter"
        r"\.weight'.*never replicates a tensor silently",
    ):
        shard_checkpoint(d, tmp_path / "out", 2)


RULES_TOML = """
[rules]
"model.embed_tokens.weight" = { split = 0, unit = "vocab" }
"lm_head.weight" = { split = 0, unit = "vocab" }
"*norm.weight" = "replicate"
"*.self_attn.q_proj.weight" = { split = 0, unit = "heads", quantize = true }
're:.*self_attn\\.[kv]_proj\\.weight' = { split = 0, unit = "kv_heads" }
"*.self_attn.o_proj.weight" = { split = 1, unit = "heads" }
"*.mlp.gate_proj.weight" = 0
"*.mlp.up_proj.weight" = 0
"*.mlp.down_proj.weight" = 1
"*.mlp.adapter.weight" = "replicate"
"""


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_rules_file_covers_unknown_architectures_and_tensors(tmp_path, fmt):
    d = copy_model(tmp_path)
    edit_config(d, architectures=["FancyNewForCausalLM"])
    tensors = source_tensors(d)
    tensors["model.layers.1.mlp.adapter.weight"] = torch.randn(4, 64)
    save_file(tensors, d / "model.safetensors")
    rules = tmp_path / f"rules.{fmt}"
    if fmt == "toml":
        rules.write_text(RULES_TOML)
    else:
        import tomllib

        rules.write_text(json.dumps(tomllib.loads(RULES_TOML)))
    out = tmp_path / "out"
    shard_checkpoint(d, out, 4, rules_file=rules)
    assert_bit_equal(reassemble(out), tensors)
    k = [
        t
        for t in json.loads((out / "hotweights.json").read_text())["tensors"]
        if t["name"] == "model.layers.0.self_attn.k_proj.weight"
    ]
    assert {t["split"]["of"] for t in k} == {2}  # the user's kv_heads unit replicates 2 KV heads on 4 ranks


def test_bad_rules_file(tmp_path):
    d = copy_model(tmp_path)
    rules = tmp_path / "rules.toml"
    rules.write_text('"*.q_proj.weight" = "sideways"\n')
    with pytest.raises(InvalidArgument, match=r"rules\.toml.*q_proj.*split must be a dimension"):
        shard_checkpoint(d, tmp_path / "out", 2, rules_file=rules)
    rules.write_text("not toml = = =")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        shard_checkpoint(d, tmp_path / "out", 2, rules_file=rules)


def test_tp_not_dividing_attention_heads(tmp_path):
    with pytest.raises(InvalidArgument, match=r"tp 3 does not divide num_attention_heads 4.*tp can be 1, 2, 4"):
        shard_checkpoint(copy_model(tmp_path), tmp_path / "out", 3)


@pytest.mark.parametrize(
    "config,tensors,tp,error,match",
    [
        pytest.param(
            dict(num_key_value_heads=3, head_dim=2),
            {"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (6, 8)},
            2,
            InvalidArgument,
            r"tp 2 neither divides num_key_value_heads 3 nor is a multiple",
            id="kv-heads",
        ),
        # Policy: no padding. vocab 126 on 4 ranks is refused rather than padded to 128.
        pytest.param(
            dict(vocab_size=126),
            {"model.embed_tokens.weight": (126, 8)},
            4,
            InvalidArgument,
            r"tp 4 does not divide vocab_size 126.*does not pad the vocabulary",
            id="vocab",
        ),
        pytest.param(
            {},
            {"model.layers.0.mlp.up_proj.weight": (6, 8)},
            4,
            InvalidArgument,
            r"'model\.layers\.0\.mlp\.up_proj\.weight': dim 0 of size 6 does not split into 4",
            id="mlp",
        ),
        pytest.param(
            dict(head_dim=2),
            {"model.layers.0.self_attn.q_proj.weight": (12, 8)},
            2,
            BadCheckpoint,
            r"q_proj\.weight'.*12 entries.*4 heads x head_dim 2 = 8",
            id="shape-vs-config",
        ),
    ],
)
def test_splits_the_model_does_not_allow(tmp_path, config, tensors, tp, error, match):
    d = tiny_source(tmp_path, hand_config(**config), {n: torch.zeros(shape) for n, shape in tensors.items()})
    with pytest.raises(error, match=match):
        shard_checkpoint(d, tmp_path / "out", tp)


@pytest.mark.parametrize(
    "missing,match", [("config.json", r"no config\.json"), ("model.safetensors", r"no \.safetensors files")]
)
def test_source_missing_a_file(tmp_path, missing, match):
    d = copy_model(tmp_path)
    (d / missing).unlink()
    with pytest.raises(BadCheckpoint, match=match):
        shard_checkpoint(d, tmp_path / "out", 2)


def test_missing_source(tmp_path):
    with pytest.raises(NotFound, match="no such directory"):
        shard_checkpoint(tmp_path / "nope", tmp_path / "out", 2)


def test_output_directory_not_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match=r"output directory is not empty"):
        shard_checkpoint(copy_model(tmp_path), out, 2)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_output_is_a_file_or_inside_the_source(tmp_path):
    d = copy_model(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        shard_checkpoint(d, tmp_path / "file", 2)
    with pytest.raises(InvalidArgument, match="must not be the source directory or inside it"):
        shard_checkpoint(d, d / "sharded", 2)


def test_empty_output_directory_is_filled(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shard_checkpoint(copy_model(tmp_path), out, 2)
    assert (out / "hotweights.json").exists()


def test_index_naming_missing_files(tmp_path):
    src, _ = build_model("qwen2_moe", max_shard_size="100KB")
    d = tmp_path / "src"
    shutil.copytree(src, d)
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(BadCheckpoint, match=rf"names {victim.name}, which does not exist"):
        shard_checkpoint(d, tmp_path / "out", 2)


def test_already_sharded_source_is_refused(tmp_path):
    out = tmp_path / "out"
    shard_checkpoint(copy_model(tmp_path), out, 2)
    with pytest.raises(InvalidArgument, match="already a hotweights sharded checkpoint"):
        shard_checkpoint(out, tmp_path / "again", 2)


def test_untied_config_without_lm_head(tmp_path):
    d = copy_model(tmp_path)
    tensors = source_tensors(d)
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(BadCheckpoint, match=r"tie_word_embeddings false.*no 'lm_head\.weight'"):
        shard_checkpoint(d, tmp_path / "out", 2)


def _failing_pwrite(after: int, exc: BaseException):
    calls = {"n": 0}
    real = writer._pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return real(fd, data, offset)

    return pwrite, calls


@pytest.mark.parametrize("pre_existing", [False, True])
def test_disk_full_mid_write_leaves_no_manifest(tmp_path, monkeypatch, pre_existing):
    out = tmp_path / "out"
    if pre_existing:
        out.mkdir()
    pwrite, calls = _failing_pwrite(20, OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(writer, "_pwrite", pwrite)
    with pytest.raises(ResourceExhausted, match=r"no space left on the device writing model-rank-\d-part-0"):
        shard_checkpoint(copy_model(tmp_path), out, 2, workers=2)
    assert calls["n"] > 20  # it failed mid-write, after headers and some tensors were written
    assert not (out / "hotweights.json").exists()
    assert_nothing_published(out)


def test_disk_full_at_reservation(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "posix_fallocate", no_space)
    with pytest.raises(ResourceExhausted, match="no space left"):
        shard_checkpoint(copy_model(tmp_path), tmp_path / "out", 2)
    assert_nothing_published(tmp_path / "out")


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    pwrite, _ = _failing_pwrite(10, KeyboardInterrupt())
    monkeypatch.setattr(writer, "_pwrite", pwrite)
    with pytest.raises(KeyboardInterrupt):
        shard_checkpoint(copy_model(tmp_path), tmp_path / "out", 2)
    assert_nothing_published(tmp_path / "out")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp": 0}, "tp must be a positive integer"),
        ({"tp": 2, "quantize": "int3"}, "--quantize takes fp8"),
        ({"tp": 2, "quantize": "fp8", "fp8_scale": "row"}, "FP8 scales must be per channel or per tensor"),
        ({"tp": 2, "parts_per_rank": 0}, "--parts-per-rank must be at least 1"),
        ({"tp": 2, "parts_per_rank": 99}, "exceeds the 21 tensors of rank 0"),
        ({"tp": 2, "parts_per_rank": 2, "max_part_size": 10}, "not both"),
        ({"tp": 2, "workers": 0}, "--workers must be at least 1, not 0"),
        ({"tp": 2, "workers": -1}, "--workers must be at least 1, not -1"),
        ({"tp": 2, "max_part_size": 0}, "--max-part-size must be at least 1 byte, not 0"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        shard_checkpoint(copy_model(tmp_path), tmp_path / "out", **kwargs)
    assert_nothing_published(tmp_path / "out")


def test_disk_full_while_copying_the_config(tmp_path, monkeypatch):
    from hotweights.tools.shard import sharder

    def no_space(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    src = copy_model(tmp_path)
    monkeypatch.setattr(sharder.shutil, "copyfile", no_space)
    with pytest.raises(ResourceExhausted, match="no space left"):
        shard_checkpoint(src, tmp_path / "out", 2)
    assert_nothing_published(tmp_path / "out")


def test_unwritable_output_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if (parent / "probe").exists() or _can_write(parent):
            pytest.skip("running as a user that ignores directory permissions")
        with pytest.raises(FailedPrecondition, match=r"cannot write .*ro/out.*Permission denied"):
            shard_checkpoint(copy_model(tmp_path), parent / "out", 2)
    finally:
        parent.chmod(0o700)


def _can_write(d: Path) -> bool:
    try:
        (d / "probe").write_text("x")
    except OSError:
        return False
    (d / "probe").unlink()
    return True
