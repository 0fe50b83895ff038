"""Regressions for the review of the checkpoint tooling and format readers (findings F1-F17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotweights.errors import BadCheckpoint
from hotweights.format import safetensors as st
from hotweights.format.safetensors import parse_header


def _no_parse(monkeypatch) -> None:
    """Fails the test if the header's JSON gets parsed: the guard must refuse before."""

    def boom(*a, **k):
        raise AssertionError("json.loads ran on a header the pre-parse guard should have refused")

    monkeypatch.setattr(st.json, "loads", boom)


# F13: the pre-parse bound holds whatever the spelling of the keys.


def test_escaped_key_spelling_is_refused_before_the_parse(monkeypatch):
    n = 2000
    entry = '"t{i}":{{"dtype":"U8","shape":[1],"data\\u005foffsets":[{i},{j}]}}'
    raw = ("{" + ",".join(entry.format(i=i, j=i + 1) for i in range(n)) + "}").encode()
    assert raw.count(b'"data_offsets"') == 0  # the old count saw no entry at all
    _no_parse(monkeypatch)
    with pytest.raises(BadCheckpoint, match=r"header holds \d+ JSON members and array elements") as info:
        parse_header(Path("esc.safetensors"), 8 + len(raw) + n, raw, max_tensors=10)
    assert info.value.details["limit"] == st._TOKENS_PER_TENSOR * 10 + st._METADATA_TOKENS


def test_junk_keys_in_one_entry_are_refused_before_the_parse(monkeypatch):
    junk = ",".join(f'"k{i}":0' for i in range(20_000))
    raw = ('{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0],' + junk + "}}").encode()
    _no_parse(monkeypatch)
    with pytest.raises(BadCheckpoint, match="JSON members and array elements"):
        parse_header(Path("junk.safetensors"), 8 + len(raw), raw, max_tensors=10)


def test_a_few_junk_keys_in_an_entry_are_refused_naming_one():
    raw = b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"zz":1,"extra":2}}'
    with pytest.raises(BadCheckpoint, match=r"tensor 't': entry holds 2 key\(s\) besides .*first 'extra'"):
        parse_header(Path("junk.safetensors"), 8 + len(raw) + 1, raw)


def test_separators_inside_strings_do_not_count():
    # Metadata text full of ':' and ',' (a JSON document kept as a string) builds nothing: recounted without it.
    meta = {"notes": json.dumps({f"k{i}": [i, i] for i in range(5000)})}
    doc = {"__metadata__": meta, "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    raw = json.dumps(doc).encode()
    assert raw.count(b":") + raw.count(b",") > 12 * 10 + 8192
    h = parse_header(Path("meta.safetensors"), 8 + len(raw) + 2, raw, max_tensors=10)
    assert [t.name for t in h.tensors] == ["a"] and h.metadata == meta


def test_a_header_at_the_tensor_limit_passes_the_guard():
    n = 50
    doc = {f"t{i}": {"dtype": "U8", "shape": [1, 1, 1, 1], "data_offsets": [i, i + 1]} for i in range(n)}
    doc["__metadata__"] = {"format": "pt"}
    raw = json.dumps(doc).encode()
    assert len(parse_header(Path("ok.safetensors"), 8 + len(raw) + n, raw, max_tensors=n).tensors) == n


# F16: dimensions an int64 cannot hold are refused even when the tensor has no elements.


@pytest.mark.parametrize("shape", [[2**70, 0], [2**63, 0], [0, 2**40, 2**40], [2**32, 2**31, 0]])
def test_dimensions_beyond_int64_are_refused(shape):
    doc = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "huge": {"dtype": "BF16", "shape": shape, "data_offsets": [1, 1]},
    }
    raw = json.dumps(doc).encode()
    with pytest.raises(BadCheckpoint, match=r"tensor 'huge': shape .* is beyond what an int64 holds"):
        parse_header(Path("big.safetensors"), 8 + len(raw) + 1, raw)


def test_large_but_representable_zero_size_dimension_is_accepted():
    raw = json.dumps({"z": {"dtype": "BF16", "shape": [2**62, 0], "data_offsets": [0, 0]}}).encode()
    assert parse_header(Path("z.safetensors"), 8 + len(raw), raw).tensors[0].shape == (2**62, 0)


# F1, F3: hotweights.json entries are checked before anything is built from them.


def _sharded_copy(tmp_path: Path) -> Path:
    import shutil

    from support.tp_forward import shard_cached

    d = tmp_path / "ckpt"
    shutil.copytree(shard_cached("llama_gqa", 2, parts_per_rank=2), d)
    return d


def _edit_manifest(d: Path, edit) -> None:
    p = d / "hotweights.json"
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))


def test_a_huge_tp_size_is_refused_without_building_its_range(tmp_path, monkeypatch):
    from hotweights.format import manifest

    d = _sharded_copy(tmp_path)
    _edit_manifest(d, lambda doc: doc.update(tp_size=10**12))
    real_range = range

    def small_range(*args):
        assert max(args) < 10**6, f"range{args} built from tp_size"
        return real_range(*args)

    monkeypatch.setattr("builtins.range", small_range)
    with pytest.raises(BadCheckpoint, match=r"tp_size 1000000000000 exceeds the 4 file\(s\) it lists"):
        manifest.verify_checkpoint(d, "fast")


def test_missing_ranks_are_named_a_few_at_a_time(tmp_path):
    from hotweights.format import manifest

    d = _sharded_copy(tmp_path)

    def one_rank(doc):
        for name in [n for n, info in doc["files"].items() if info["rank"] == 1]:
            (d / name).unlink()
            del doc["files"][name]
        doc["tensors"] = [t for t in doc["tensors"] if t["rank"] != 1]
        doc["tp_size"] = 2

    _edit_manifest(d, one_rank)
    with pytest.raises(BadCheckpoint, match=r"lists no files for rank\(s\) \[1\] of tp_size 2"):
        manifest.verify_checkpoint(d, "fast")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"file": []}, r"tensor entry 0 \('[^']+'\) has no file str"),
        ({"file": None}, r"tensor entry 0 .* has no file str"),
        ({"rank": None}, r"tensor entry 0 .* has rank None, not a non-negative integer"),
        ({"rank": 9}, r"tensor entry 0 .* says rank 9, but its file .* is rank 0's"),
        ({"rank": -1}, r"has rank -1, not a non-negative integer"),
        ({"rank": True}, r"has rank True, not a non-negative integer"),
        ({"shape": [1, "2"]}, r"has shape \[1, '2'\], not a list of non-negative integers"),
        ({"nbytes": -5}, r"has nbytes -5"),
    ],
)
def test_malformed_tensor_entries_are_typed_errors_naming_the_entry(tmp_path, change, match):
    from hotweights.format import manifest
    from hotweights.tools import capacity

    d = _sharded_copy(tmp_path)

    def edit(doc):
        first = next(i for i, t in enumerate(doc["tensors"]) if t["rank"] == 0)
        doc["tensors"].insert(0, doc["tensors"].pop(first))
        doc["tensors"][0].update(change)

    _edit_manifest(d, edit)
    with pytest.raises(BadCheckpoint, match=match):
        manifest.verify_checkpoint(d, "fast")
    with pytest.raises(BadCheckpoint, match=match):
        capacity.plan(d, 2, 80 * 10**9)


def test_an_entry_without_rank_or_a_wrong_nbytes_fails_verify(tmp_path):
    from hotweights.errors import DataLoss
    from hotweights.format import manifest

    d = _sharded_copy(tmp_path)
    _edit_manifest(d, lambda doc: doc["tensors"][0].pop("rank"))
    with pytest.raises(BadCheckpoint, match=r"tensor entry 0 .* has rank None"):
        manifest.verify_checkpoint(d, "fast")

    d2 = _sharded_copy(tmp_path / "b")
    _edit_manifest(d2, lambda doc: doc["tensors"][0].update(nbytes=10**12))
    with pytest.raises(DataLoss, match=r"spans \d+ bytes, the manifest.s nbytes is 1000000000000"):
        manifest.verify_checkpoint(d2, "fast")


# F2, F17: model.safetensors.index.json.


def _indexed_source(tmp_path: Path, weight_map) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "src"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("bad", [1, ["x"], None, "", {"f": 1}])
def test_index_values_that_are_not_file_names_are_typed_errors(tmp_path, bad):
    from hotweights.format.checkpoint import open_checkpoint

    d = _indexed_source(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": bad})
    with pytest.raises(BadCheckpoint, match=r"weight_map entry 'b' names an invalid file"):
        open_checkpoint(d)


def test_an_empty_weight_map_is_refused(tmp_path):
    from hotweights.format.checkpoint import open_checkpoint

    d = _indexed_source(tmp_path, {})
    with pytest.raises(BadCheckpoint, match="weight_map is empty"):
        open_checkpoint(d)


# F11: one file of a sharded checkpoint is not a model.


def test_one_part_file_is_refused_naming_its_directory(tmp_path):
    from hotweights.format.checkpoint import open_checkpoint
    from hotweights.format.manifest import load_manifest

    d = _sharded_copy(tmp_path)
    part = d / "model-rank-0-part-0.safetensors"
    with pytest.raises(BadCheckpoint, match=r"is one file of a sharded checkpoint.*load its directory"):
        open_checkpoint(part)
    # a file inside has its directory's manifest, as verify_checkpoint already says
    assert load_manifest(part) is not None


def test_a_part_name_alone_is_refused_even_without_a_manifest(tmp_path):
    import torch
    from safetensors.torch import save_file

    from hotweights.format.checkpoint import open_checkpoint

    p = tmp_path / "model-rank-1-part-0.safetensors"
    save_file({"a": torch.ones(2)}, str(p))
    with pytest.raises(BadCheckpoint, match="is one file of a sharded checkpoint"):
        open_checkpoint(p)


# F12: one spelling per rank and part.


@pytest.mark.parametrize("odd", ["model-rank-01-part-0.safetensors", "model-rank-\u0661-part-0.safetensors"])
def test_ambiguous_shard_names_are_refused(tmp_path, odd):
    import torch
    from safetensors.torch import save_file

    from hotweights.format.checkpoint import open_checkpoint

    d = tmp_path / "m"
    d.mkdir()
    for name, value in (("model-rank-0-part-0.safetensors", 0.0), ("model-rank-1-part-0.safetensors", 1.0), (odd, 2.0)):
        save_file({"a": torch.full((2,), value)}, str(d / name))
    with pytest.raises(BadCheckpoint, match="is not a shard name hotweights reads"):
        open_checkpoint(d)


# F9, F10: the offline vLLM converter publishes all or nothing, and reads what the index names.

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 64,
    "intermediate_size": 48,
    "tie_word_embeddings": False,
}


def _llama_tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    h, i, v, q, kv = 32, 48, 64, 32, 16

    def r(*shape):
        return torch.randn(*shape, generator=g)

    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": r(v, h),
        "model.norm.weight": r(h),
        "lm_head.weight": r(v, h),
        p + "input_layernorm.weight": r(h),
        p + "post_attention_layernorm.weight": r(h),
        p + "self_attn.q_proj.weight": r(q, h),
        p + "self_attn.k_proj.weight": r(kv, h),
        p + "self_attn.v_proj.weight": r(kv, h),
        p + "self_attn.o_proj.weight": r(h, q),
        p + "mlp.gate_proj.weight": r(i, h),
        p + "mlp.up_proj.weight": r(i, h),
        p + "mlp.down_proj.weight": r(h, i),
    }


def _llama_source(d: Path, files: int = 1, **config) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({**LLAMA, **config}))
    tensors = _llama_tensors()
    if files == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    names = sorted(tensors)
    weight_map = {}
    for k in range(files):
        fn = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[k::files]}
        save_file(chunk, str(d / fn))
        weight_map.update(dict.fromkeys(chunk, fn))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "partial" in p.name)


def test_converter_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from hotweights import vllm_layout

    src = _llama_source(tmp_path / "src")
    real = safetensors.torch.save_file
    calls = []

    def interrupted(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        vllm_layout.convert(src, out, 2)
    assert not out.exists() and _leftovers(tmp_path) == []
    # the retry is not blocked by what the failed run left
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    paths = vllm_layout.convert(src, out, 2)
    assert [p.name for p in paths] == ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]
    assert (out / "hotweights-layout.json").is_file() and _leftovers(tmp_path) == []


def test_converter_disk_full_is_typed_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from hotweights import vllm_layout
    from hotweights.errors import ResourceExhausted

    class SafetensorError(Exception):
        pass

    def full(tensors, path, metadata=None):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    src = _llama_source(tmp_path / "src")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(ResourceExhausted, match="no space left on the device writing"):
        vllm_layout.convert(src, out, 1)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_converter_refuses_unsupported_input_before_writing(tmp_path):
    from hotweights import vllm_layout
    from hotweights.errors import InvalidArgument

    src = _llama_source(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(InvalidArgument, match="tp=3 does not divide"):
        vllm_layout.convert(src, out, 3)
    fp8 = _llama_source(
        tmp_path / "fp8",
        quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None},
    )
    with pytest.raises(InvalidArgument, match="quantization"):
        vllm_layout.convert(fp8, out, 1)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert vllm_layout.main([str(src), str(out), "--tp", "3"]) == 2


def test_converter_follows_the_index_and_refuses_names_it_has_no_rule_for(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hotweights import vllm_layout
    from hotweights.errors import InvalidArgument

    src = _llama_source(tmp_path / "mistral", files=2)
    # Mistral's hub repos ship the same weights again in their own names beside the index
    save_file({"tok_embeddings.weight": torch.ones(64, 32)}, str(src / "consolidated.safetensors"))
    out = tmp_path / "out"
    vllm_layout.convert(src, out, 2)
    with safe_open(str(out / "model-rank-0-part-0.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "tok_embeddings.weight" not in names and "model.layers.0.self_attn.qkv_proj.weight" in names
    # without an index, a tensor in no vLLM name is refused rather than copied whole into every rank
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(InvalidArgument, match=r"consolidated.safetensors: tensor 'tok_embeddings.weight' is not"):
        vllm_layout.convert(src, tmp_path / "out2", 2)
    assert not (tmp_path / "out2").exists()


def test_converter_refuses_a_non_empty_or_linked_output(tmp_path):
    from hotweights import vllm_layout
    from hotweights.errors import FailedPrecondition

    src = _llama_source(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty"):
        vllm_layout.convert(src, busy, 1)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FailedPrecondition, match="is a symbolic link"):
        vllm_layout.convert(src, tmp_path / "link", 1)


# F4-F7, F14: hotweights shard.


def _fd_paths_fsynced(monkeypatch) -> list[str]:
    import os

    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_shard_fsyncs_the_manifest_and_side_files_before_publishing(tmp_path, monkeypatch):
    from hotweights.tools.shard import shard_checkpoint

    src = _llama_source(tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    synced = _fd_paths_fsynced(monkeypatch)
    out = tmp_path / "out"
    shard_checkpoint(src, out, 2, quantize="fp8")
    names = {Path(p).name for p in synced}
    for name in ("hotweights.json.tmp", "config.json", "tokenizer.json", "generation_config.json"):
        assert name in names, f"{name} was not fsynced before the publish ({sorted(names)})"


def test_fp8_of_a_zero_size_weight_is_an_empty_fp8_tensor():
    import torch

    from hotweights.tools.shard.quantize import FP8_DTYPE, quantize_fp8

    for shape, gran, scale_shape in (((0, 8), "channel", (0, 1)), ((8, 0), "channel", (8, 1)), ((0, 8), "tensor", ())):
        q, scale = quantize_fp8(torch.zeros(shape, dtype=torch.bfloat16), gran, "w")
        assert q.dtype == FP8_DTYPE and tuple(q.shape) == shape
        assert tuple(scale.shape) == scale_shape and scale.dtype == torch.float32 and bool((scale == 1).all())


def test_shard_fp8_of_a_model_with_zero_size_mlp(tmp_path):
    from hotweights.tools.shard import shard_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLAMA, "intermediate_size": 0}))
    import torch
    from safetensors.torch import save_file

    tensors = _llama_tensors()
    for k in ("gate_proj", "up_proj"):
        tensors[f"model.layers.0.mlp.{k}.weight"] = torch.zeros(0, 32)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 0)
    save_file(tensors, str(src / "model.safetensors"))
    for scale in ("channel", "tensor"):
        r = shard_checkpoint(src, tmp_path / f"out-{scale}", 1, quantize="fp8", fp8_scale=scale)
        assert r.files == ["model-rank-0-part-0.safetensors"]


@pytest.mark.parametrize("dangling", [False, True])
def test_shard_refuses_a_symlinked_output_before_reading(tmp_path, monkeypatch, dangling):
    from hotweights.errors import FailedPrecondition
    from hotweights.tools.shard import shard_checkpoint, sharder

    src = _llama_source(tmp_path / "src")
    target = tmp_path / "real"
    if not dangling:
        target.mkdir()
    (tmp_path / "link").symlink_to(target)

    def no_planning(*a, **k):
        raise AssertionError("the run went on past the output check")

    monkeypatch.setattr(sharder, "plan_shards", no_planning)
    with pytest.raises(FailedPrecondition, match="is a symbolic link"):
        shard_checkpoint(src, tmp_path / "link", 1)


def _run_python(code: str, *args: str):
    import os
    import subprocess
    import sys

    import hotweights

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(hotweights.__file__).resolve().parents[1])  # the code this test runs on

    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def test_sigterm_removes_the_staging_directory_and_still_ends_the_process(tmp_path):
    src = _llama_source(tmp_path / "src")
    code = """
import os, signal, sys
from pathlib import Path
from hotweights.tools.shard import sharder
def hash_then_term(*a, **k):
    assert list(Path(sys.argv[2]).parent.glob(".out.hotweights-partial-*")), "no staging while writing?"
    os.kill(os.getpid(), signal.SIGTERM)  # its handler raises before the next line runs
    raise AssertionError("SIGTERM did not unwind the run")
sharder._hash_parts = hash_then_term
sharder.shard_checkpoint(sys.argv[1], sys.argv[2], 2)
"""
    r = _run_python(code, str(src), str(tmp_path / "out"))
    assert r.returncode == -15, r.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_the_converter_ends_as_sigterm_ends_it_and_leaves_no_staging(tmp_path):
    src = _llama_source(tmp_path / "src")
    code = """
import os, signal, sys
from hotweights import vllm_layout
real = vllm_layout._write
def write_then_term(*a, **k):
    real(*a, **k)  # every file written into the staging directory
    os.kill(os.getpid(), signal.SIGTERM)  # its handler raises before the next line runs
    raise AssertionError("SIGTERM did not unwind the run")
vllm_layout._write = write_then_term
sys.exit(vllm_layout.main([sys.argv[1], sys.argv[2], "--tp", "1"]))
"""
    r = _run_python(code, str(src), str(tmp_path / "out"))
    assert r.returncode == -15, (r.returncode, r.stderr)  # like `hotweights shard`, not Ctrl-C's 130
    assert "terminated" in r.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_many_parts_do_not_hold_a_descriptor_each(tmp_path):
    src = _llama_source(tmp_path / "src")
    code = """
import os, resource, sys
import torch  # imported before the limit is set
from hotweights.tools.shard import shard_checkpoint
# 16 descriptors beyond those open now: fewer than the parts, more than the writes and hashes in flight
n = len(os.listdir("/proc/self/fd")) + 16
resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
r = shard_checkpoint(sys.argv[1], sys.argv[2], 2, max_part_size=1, workers=2)
print(len(r.files))
"""
    # 2 ranks x 11-12 tensors, one part each
    r = _run_python(code, str(src), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) > 20


def test_a_plan_with_more_parts_than_the_daemon_opens_is_refused(tmp_path, monkeypatch):
    from hotweights.errors import InvalidArgument
    from hotweights.tools.shard import shard_checkpoint, sharder

    src = _llama_source(tmp_path / "src")
    monkeypatch.setattr(sharder, "DEFAULT_MAX_FILES", 3)
    with pytest.raises(InvalidArgument, match=r"the plan makes 4 part files; the daemon opens at most 3"):
        shard_checkpoint(src, tmp_path / "out", 2, parts_per_rank=2)
    assert not (tmp_path / "out").exists()


# F8, F15: plan's Qwen2-MoE biases; the divisors an error message offers.


def test_qwen2_moe_has_qkv_biases_in_the_config_model():
    from hotweights.tools.shard.model_config import parse_config

    raw = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "intermediate_size": 96,
    }
    cfg = parse_config(raw)
    assert cfg.qkv_bias and not cfg.o_bias


def test_divisors_are_found_up_to_the_square_root_only():
    import time

    from hotweights.tools.shard.model_config import divisors

    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert divisors(1) == [1] and divisors(0) == [] and divisors(-4) == []
    assert divisors(720720, 12) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert divisors(97, 12) == [1, 97]
    for n in range(1, 300):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    started = time.monotonic()
    assert divisors(10_000_000_019, 12) == [1, 10_000_000_019]  # a prime near 10**10
    assert time.monotonic() - started < 1.0


def test_an_index_of_more_entries_than_the_rank_limit_is_refused_before_its_parse(tmp_path, monkeypatch):
    from hotweights.format import checkpoint
    from hotweights.format.checkpoint import HeaderLimits, open_checkpoint

    d = _indexed_source(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    junk = {f"x{i}": "model-00001-of-00002.safetensors" for i in range(5000)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": junk}))

    def boom(*a, **k):
        raise AssertionError("the index was parsed")

    monkeypatch.setattr(checkpoint.json, "loads", boom)
    with pytest.raises(BadCheckpoint, match=r"holds \d+ JSON members .* at most 10 tensors"):
        open_checkpoint(d, limits=HeaderLimits(max_tensors_per_rank=10))


def test_the_recount_outside_strings_takes_one_pass_over_an_unclosed_string_of_escaped_quotes():
    """A pattern allowing escapes inside strings backtracks quadratically on this (minutes at 1 MB); the
    recount must stay linear. Counted on a bound the test's own input sets, not on a clock."""
    raw = b'{"a":"' + b'\\"' * 20_000 + b":," * 10
    calls = []
    real = st._STRING.sub

    class Spy:
        def sub(self, repl, text):
            calls.append(len(text))
            return real(repl, text)

    orig = st._STRING
    st._STRING = Spy()
    try:
        n, exact = st.count_json_members(raw, limit=5)
    finally:
        st._STRING = orig
    assert exact
    assert calls and calls[0] < len(raw) // 2  # the escape pairs went first: the strings' pass is short
    assert n == 21  # the unclosed string leaves its tail counted


@pytest.mark.parametrize("ndim", [6, 9])
def test_a_header_of_many_tensors_with_many_dimensions_is_within_the_member_bound(ndim):
    n = 1000
    entries = {f"t{i}": {"dtype": "F16", "shape": [1] * ndim, "data_offsets": [2 * i, 2 * i + 2]} for i in range(n)}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    count, _ = st.count_json_members(raw, limit=10**9)
    assert count <= st._TOKENS_PER_TENSOR * n + st._METADATA_TOKENS
