"""The loader applies vLLM's layout itself (``load ... layout="vllm"``): each rank serves exactly the
tensors the offline converter builds (fused q|k|v and gate|up as views over parts placed back to back,
the vocabulary padded with zero rows inside the allocation), refuses a checkpoint split otherwise than
vLLM splits it, records the layout, shares memory only within one layout, and keeps the served table
across a restart from the fd store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hotweights import errors, vllm_layout
from hotweights.format.dtypes import torch_dtype
from hotweights.format.engine_layout import Fused, RankRecipe, rank_recipe
from hotweights.tools.shard.sharder import shard_checkpoint
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import State
from hotweightsd.persist import statefile
from hotweightsd.persist.fdstore import Persister
from hotweightsd.persist.restore import restore
from support.models import save_model, tiny_llama_config, tiny_mixtral_config
from support.served import served_bytes
from support.svcmgr import hand_over_fds

MiB = 2**20


@pytest.fixture
def manager():
    m = ModelManager(CpuBackend(memory_limit=256 * MiB))
    yield m
    m.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama (GQA, untied, vocabulary 500: vLLM pads it to 512)."""
    return save_model(tiny_llama_config(), tmp_path_factory.mktemp("llama") / "hf")


def _served(m: ModelManager, ref: str, rank: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor rank ``rank`` of ``ref`` serves, as a client builds it from the table and the fds."""
    return {
        name: torch.frombuffer(raw, dtype=torch_dtype(p.dtype)).reshape(p.shape)
        for name, (p, raw) in served_bytes(m, ref, rank).items()
    }


def _offline(hf: Path, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """What the offline converter writes for ``rank`` (the recipe the vLLM tier checks against vLLM)."""
    config = json.loads((hf / "config.json").read_text())
    files = sorted(hf.glob("*.safetensors"))
    handles = {f: safe_open(str(f), "pt") for f in files}
    where = {k: f for f in files for k in handles[f].keys()}
    return vllm_layout.build_rank(lambda n: handles[where[n]].get_tensor(n), list(where), config, tp, rank)


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_a_hugging_face_checkpoint_loaded_in_vllms_layout_serves_what_the_converter_writes(manager, llama):
    mv = manager.load("m", str(llama), layout="vllm")
    assert mv.state is State.READY and mv.layout == "vllm" and mv.version.endswith("-vllm")
    got = _served(manager, "m")
    _equal(got, _offline(llama, 1, 0))
    assert "model.layers.0.self_attn.q_proj.weight" not in got and "model.layers.0.mlp.up_proj.weight" not in got
    assert got["model.embed_tokens.weight"].shape[0] == 512 and not got["model.embed_tokens.weight"][500:].any()
    # the fused tensor is a view over its parts: they lie back to back where the table says
    table = {p.name: p for p in mv.ranks[0].layout.table()}
    parts = {p.name: p for p in mv.ranks[0].layout.placements}
    qkv = table["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = (parts[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert (q.offset, k.offset, v.offset) == (qkv.offset, q.offset + q.nbytes, k.offset + k.nbytes)
    assert qkv.nbytes == q.nbytes + k.nbytes + v.nbytes and q.allocation == k.allocation == v.allocation
    assert mv.bytes_total == sum(p.nbytes for p in parts.values())  # what was read, not the padding


@pytest.mark.parametrize("tp", [1, 2])
def test_an_fp8_checkpoint_fuses_its_channel_scales_with_the_rows_they_scale(manager, tmp_path, tp):
    hf = save_model(tiny_llama_config(vocab_size=512), tmp_path / "hf")
    fp8 = tmp_path / "fp8-tp1"
    shard_checkpoint(hf, fp8, 1, quantize="fp8", fp8_scale="channel")
    src = fp8 if tp == 1 else tmp_path / f"fp8-tp{tp}"
    if tp > 1:
        shard_checkpoint(hf, src, tp, quantize="fp8", fp8_scale="channel")
    mv = manager.load("m", str(src), layout="vllm")
    assert mv.layout == "vllm"
    for rank in range(tp):
        got = _served(manager, "m", rank)
        _equal(got, _offline(fp8, tp, rank))  # the converter's rank cut of the unsplit FP8 checkpoint
        qkv = got["model.layers.0.self_attn.qkv_proj.weight"]
        scale = got["model.layers.0.self_attn.qkv_proj.weight_scale"]
        assert qkv.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert scale.shape == (qkv.shape[0], 1) and got["model.layers.0.mlp.gate_up_proj.weight_scale"].shape[1] == 1
        assert "model.layers.0.self_attn.q_proj.weight_scale" not in got
        # a row-parallel layer's scales are per output row, which it does not split: whole on every rank
        assert got["model.layers.0.self_attn.o_proj.weight_scale"].shape == (128, 1)


def test_a_checkpoint_sharded_as_vllm_shards_it_loads_in_its_layout_rank_by_rank(manager, tmp_path):
    hf = save_model(tiny_llama_config(vocab_size=512), tmp_path / "hf")
    shard_checkpoint(hf, tmp_path / "tp2", 2)
    manager.load("m", str(tmp_path / "tp2"), layout="vllm")
    for rank in (0, 1):
        _equal(_served(manager, "m", rank), _offline(hf, 2, rank))


def test_a_vocabulary_split_without_vllms_padding_is_refused_before_anything_is_allocated(manager, llama, tmp_path):
    shard_checkpoint(llama, tmp_path / "tp2", 2)  # 500 rows split 250 / 250; vLLM gives 256 / 244
    with pytest.raises(errors.InvalidArgument) as e:
        manager.load("m", str(tmp_path / "tp2"), layout="vllm")
    msg = str(e.value)
    assert "model.embed_tokens.weight has 250 rows on rank 0" in msg and "padded to 512" in msg
    assert "hotweights.vllm_layout" in msg  # what to do instead
    assert manager.versions() == [] and manager.backend._resident == 0


def test_unknown_layouts_and_checkpoints_the_layout_does_not_fit_are_refused(manager, llama, tmp_path):
    with pytest.raises(errors.InvalidArgument, match="unknown layout 'sglang'"):
        manager.load("m", str(llama), layout="sglang")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(errors.InvalidArgument, match="no config.json beside the checkpoint"):
        manager.load("m", str(bare), layout="vllm")
    config = json.loads((llama / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(errors.InvalidArgument, match="GPT2LMHeadModel"):
        manager.load("m", str(bare), layout="vllm")
    for bad in ('{"architectures": 5}', json.dumps(config).replace('"vocab_size": 500', '"vocab_size": Infinity')):
        (bare / "config.json").write_text(bad)
        with pytest.raises(errors.InvalidArgument, match="vLLM layout|not a number"):
            manager.load("m", str(bare), layout="vllm")
    from hotweights.tools.shard.quantize import quantization_config

    channel = quantization_config("channel", ["lm_head"])
    static = json.loads(json.dumps(channel))
    static["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "float", "dynamic": False}
    for qc, what, extra in (
        ({"quant_method": "fp8"}, "FP8 with one scale per tensor or per block", {}),
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'", {}),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors other than", {}),
        (static, "compressed-tensors other than", {}),
        ({**channel, "kv_cache_scheme": {"num_bits": 8}}, "compressed-tensors other than", {}),
        (channel, "FP8 experts", {"num_local_experts": 4}),
    ):
        (bare / "config.json").write_text(json.dumps({**config, **extra, "quantization_config": qc}))
        with pytest.raises(errors.InvalidArgument, match=f"quantization \\({what}"):
            manager.load("m", str(bare), layout="vllm")
    assert manager.versions() == []


def _bf16(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: ("BF16", v) for k, v in shapes.items()}


CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIG |= {"hidden_size": 128, "head_dim": 32, "vocab_size": 512, "intermediate_size": 256}


def test_a_fused_tensor_missing_a_part_or_cut_otherwise_names_every_offender():
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (128, 128),
        "model.layers.0.self_attn.v_proj.weight": (64, 128),
        "model.layers.0.self_attn.o_proj.weight": (128, 128),  # tp=2 gives each rank 64 columns
        "model.layers.0.mlp.gate_proj.weight": (128, 128),
        "model.layers.0.mlp.up_proj.weight": (128, 128),
    }
    with pytest.raises(errors.InvalidArgument) as e:
        rank_recipe("vllm", CONFIG, 2, 0, _bf16(shapes))
    msg = str(e.value)
    assert "qkv_proj.weight lacks its k part(s)" in msg and "o_proj.weight has 128 columns" in msg
    assert len(e.value.details["problems"]) == 2
    # the same at tp=1: gate|up fuse, nothing padded (512 is a multiple of 64)
    shapes["model.layers.0.self_attn.k_proj.weight"] = (64, 128)
    shapes["model.layers.0.mlp.gate_proj.weight"] = shapes["model.layers.0.mlp.up_proj.weight"] = (256, 128)
    recipe = rank_recipe("vllm", CONFIG, 1, 0, _bf16(shapes))
    gate_up = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    assert Fused("model.layers.0.mlp.gate_up_proj.weight", gate_up) in recipe.fused
    assert rank_recipe("", CONFIG, 1, 0, _bf16(shapes)) == RankRecipe()


def test_parts_of_other_dtypes_or_a_fused_tensor_beside_its_parts_are_refused():
    parts = {f"model.layers.0.self_attn.{x}_proj.bias": ("BF16", (n,)) for x, n in (("q", 128), ("k", 64), ("v", 64))}
    parts["model.layers.0.self_attn.k_proj.bias"] = ("F32", (64,))
    with pytest.raises(errors.InvalidArgument, match=r"qkv_proj.bias differ in dtype: \['BF16', 'F32', 'BF16'\]"):
        rank_recipe("vllm", CONFIG, 1, 0, parts)
    both = _bf16(
        {"model.layers.0.mlp.gate_up_proj.weight": (512, 128), "model.layers.0.mlp.gate_proj.weight": (256, 128)}
    )
    for shapes in (both, dict(reversed(both.items()))):  # in either order
        with pytest.raises(
            errors.InvalidArgument, match="holds model.layers.0.mlp.gate_up_proj.weight and also its parts"
        ):
            rank_recipe("vllm", CONFIG, 1, 0, shapes)


def test_a_rank_whose_vocabulary_part_is_all_padding_still_reserves_its_rows(manager, tmp_path):
    """Vocabulary 65 at tp=4: padded to 128, 32 rows a rank; rank 3 holds none of the real rows."""
    config = {**CONFIG, "vocab_size": 65, "hidden_size": 64, "head_dim": 16, "intermediate_size": 128}
    config |= {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True}
    out = tmp_path / "tp4"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    for rank in range(4):
        rows = [32, 32, 1, 0][rank]
        save_file(
            {
                "model.embed_tokens.weight": torch.ones(rows, 64, dtype=torch.bfloat16),
                "model.norm.weight": torch.ones(64, dtype=torch.bfloat16),
            },
            str(out / f"model-rank-{rank}-part-0.safetensors"),
        )
    manager.load("m", str(out), layout="vllm")
    for rank, real in enumerate([32, 32, 1, 0]):
        embed = _served(manager, "m", rank)["model.embed_tokens.weight"]
        assert embed.shape == (32, 64) and embed[:real].eq(1).all() and not embed[real:].any()
    # nothing overlaps: each served entry has its own bytes
    for r in manager.get("m", manager.versions()[0].version).ranks:
        spans = sorted((p.allocation, p.offset, p.offset + p.nbytes) for p in r.layout.table())
        assert all(a[2] <= b[1] for a, b in zip(spans, spans[1:]) if a[0] == b[0]), spans


def test_a_padded_vocabulary_is_taken_as_it_is_only_from_a_checkpoint_converted_for_these_ranks(
    manager, llama, tmp_path
):
    out = tmp_path / "vllm-tp2"
    vllm_layout.convert(llama, out, 2)  # 256 rows a rank, the converter's marker beside them
    manager.load("conv", str(out), layout="vllm")
    for rank in (0, 1):
        _equal(_served(manager, "conv", rank), _offline(llama, 2, rank))
    # the same rows without the marker could be any split of 512 rows: refused
    (out / "hotweights-layout.json").unlink()
    with pytest.raises(errors.InvalidArgument, match="model.embed_tokens.weight has 256 rows on rank 1"):
        manager.load("bare", str(out), layout="vllm")


def test_a_tied_lm_head_in_the_checkpoint_is_neither_read_nor_served(manager, tmp_path):
    config = {**CONFIG, "tie_word_embeddings": True}
    out = tmp_path / "tied"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    w = torch.randn(512, 128).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": w, "lm_head.weight": w.clone()}, str(out / "model.safetensors"))
    mv = manager.load("m", str(out), layout="vllm")
    assert sorted(_served(manager, "m")) == ["model.embed_tokens.weight"]
    assert mv.bytes_total == w.numel() * 2  # lm_head not read


def test_the_same_files_in_another_layout_are_neither_shared_nor_the_same_version(manager, llama):
    plain = manager.load("m", str(llama))
    laid = manager.load("m", str(llama), layout="vllm")  # the default version names the layout
    assert plain.key != laid.key and not laid.shares and manager.shares_with(laid) == ""
    assert manager.resident_bytes() == plain.resident_bytes + laid.resident_bytes
    again = manager.load("n", str(llama), layout="vllm")
    assert again.shares == laid.key  # the same layout is shared as any same-files load
    with pytest.raises(errors.ContentMismatch, match="loaded in layout vllm, this load asks for none"):
        manager.load("m", str(llama), version=laid.version)


def test_a_restart_from_the_fd_store_serves_the_same_fused_table(llama, tmp_path):
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    m1 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m1.load("m", str(llama), version="v1", layout="vllm")
        before = _served(m1, "m@v1")
        p1 = Persister(m1, state, sock, fdstore=True)
        received = hand_over_fds(m1, p1, ("m@v1",))
        statefile.save(state, p1.snapshot())
    finally:
        m1.close()
    m2 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        report = restore(m2, m2.backend, Persister(m2, state, sock, fdstore=True), received)
        assert report.restored == ["m@v1"], report.note
        assert m2.get("m", "v1").layout == "vllm"
        _equal(_served(m2, "m@v1"), before)
    finally:
        m2.close()


def test_a_restart_from_the_fd_store_keeps_a_version_in_a_layout_that_had_nothing_to_fuse(llama, tmp_path):
    """The converter's output is in vLLM's layout already: loaded with layout vllm it has no served table
    of its own, and the restart must serve it (and every version beside it) as it was, not start empty."""
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    converted = tmp_path / "converted"
    vllm_layout.convert(llama, converted, 1)
    m1 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m1.load("plain", str(llama), version="v1")
        m1.load("conv", str(converted), version="v1", layout="vllm")
        before = _served(m1, "conv@v1")
        p1 = Persister(m1, state, sock, fdstore=True)
        received = hand_over_fds(m1, p1, ("plain@v1", "conv@v1"))
        statefile.save(state, p1.snapshot())
    finally:
        m1.close()
    m2 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        report = restore(m2, m2.backend, Persister(m2, state, sock, fdstore=True), received)
        assert sorted(report.restored) == ["conv@v1", "plain@v1"], report.note
        assert m2.get("conv", "v1").layout == "vllm"
        _equal(_served(m2, "conv@v1"), before)
    finally:
        m2.close()


def test_the_same_files_under_another_config_are_other_content_in_a_layout(manager, llama, tmp_path):
    """The layout is cut from config.json: the same weight files beside a config that ties the embeddings
    drop lm_head, so a version of them never shares (or rejoins) one whose config keeps it."""
    tied = tmp_path / "tied"
    tied.mkdir()
    for f in llama.glob("*.safetensors"):
        (tied / f.name).symlink_to(f)  # the very same files (inodes)
    config = json.loads((llama / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    untied = manager.load("untied", str(llama), layout="vllm")
    mv = manager.load("tied", str(tied), layout="vllm")
    assert not mv.shares and "nothing read" not in mv.load_path
    assert "lm_head.weight" in _served(manager, "untied") and "lm_head.weight" not in _served(manager, "tied")
    assert untied.version == mv.version  # the files' fingerprint: a load by that key must not rejoin the other
    with pytest.raises(errors.ContentMismatch, match="config.json changed"):
        manager.load("untied", str(tied), layout="vllm")


def test_a_file_with_the_parts_in_another_order_still_serves_them_in_vllms_order(manager, llama, tmp_path):
    """v before q in the file: the parts are placed by the fused order, not the file's."""
    with safe_open(str(llama / "model.safetensors"), "pt") as st:
        tensors = {k: st.get_tensor(k) for k in reversed(list(st.keys()))}
    out = tmp_path / "reordered"
    out.mkdir()
    save_file(dict(sorted(tensors.items(), reverse=True)), str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(llama / "config.json", out / "config.json")
    manager.load("m", str(out), layout="vllm")
    _equal(_served(manager, "m"), _offline(llama, 1, 0))


def test_a_restart_that_reads_storage_again_loads_in_the_same_layout(llama, tmp_path):
    """Without the fd store the restart reloads from the files: in the layout the version had."""
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    m1 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m1.load("m", str(llama), version="v1", layout="vllm")
        statefile.save(state, Persister(m1, state, sock, fdstore=False).snapshot())
    finally:
        m1.close()
    m2 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        report = restore(m2, m2.backend, Persister(m2, state, sock, fdstore=False), {})
        assert [(i["name"], i["version"], i["layout"]) for i in report.to_reload] == [("m", "v1", "vllm")]
        item = report.to_reload[0]
        m2.load(item["name"], item["path"], version=item["version"], layout=item["layout"])
        _equal(_served(m2, "m@v1"), _offline(llama, 1, 0))
    finally:
        m2.close()


def test_a_client_told_of_a_version_without_the_layout_it_asked_for_raises():
    """A daemon older than the layout field drops it unread: the client says so rather than let an
    engine copy what it meant to bind."""
    from hotweights.client import _layout_applied
    from hotweights.wire.pb import pb

    plain = pb.ModelVersionInfo(name="m", version="v1", layout="")
    with pytest.raises(errors.FailedPrecondition, match="without the 'vllm' layout asked for"):
        _layout_applied(plain, "vllm")
    assert _layout_applied(plain, "") is plain and _layout_applied(plain, "none") is plain
    laid = pb.ModelVersionInfo(name="m", version="v1", layout="vllm")
    assert _layout_applied(laid, "vllm") is laid


@pytest.mark.parametrize("tp", [1, 2])
def test_mixtral_experts_are_stacked_per_expert_as_vllms_fused_moe_holds_them(manager, tmp_path, tp):
    """w13 [E, 2 x rows, hidden] = each expert's w1 | w3 rows, w2 [E, hidden, columns]: the parts of every
    expert back to back, served as one tensor (unsplit at tp=1, a hotweights shard at tp=2)."""
    hf = save_model(tiny_mixtral_config(vocab_size=512 if tp > 1 else 500), tmp_path / "hf")
    src = hf
    if tp > 1:
        shard_checkpoint(hf, tmp_path / "tp", tp)
        src = tmp_path / "tp"
    manager.load("moe", str(src), layout="vllm")
    for rank in range(tp):
        got = _served(manager, "moe", rank)
        _equal(got, _offline(hf, tp, rank))
        w13 = got["model.layers.1.block_sparse_moe.experts.w13_weight"]
        w2 = got["model.layers.1.block_sparse_moe.experts.w2_weight"]
        assert w13.shape == (4, 2 * 256 // tp, 128) and not any(".experts.0.w1" in n for n in got)
        assert w2.shape == (4, 128, 256 // tp)
        # against the files directly, not through the recipe: expert e's w1 rows, then its w3 rows
        rows = slice(rank * 256 // tp, (rank + 1) * 256 // tp)
        with safe_open(str(hf / "model.safetensors"), "pt") as st:
            for e in range(4):
                pre = f"model.layers.1.block_sparse_moe.experts.{e}"
                assert torch.equal(w13[e, : 256 // tp], st.get_tensor(f"{pre}.w1.weight")[rows])
                assert torch.equal(w13[e, 256 // tp :], st.get_tensor(f"{pre}.w3.weight")[rows])
                assert torch.equal(w2[e], st.get_tensor(f"{pre}.w2.weight")[:, rows])


def test_an_expert_missing_or_beyond_the_config_is_named():
    config = {**CONFIG, "architectures": ["MixtralForCausalLM"], "num_local_experts": 2}
    pre = "model.layers.0.block_sparse_moe.experts"
    shapes = {f"{pre}.{e}.{w}.weight": ("BF16", (256, 128)) for e in (0, 2) for w in ("w1", "w3")}
    with pytest.raises(errors.InvalidArgument) as e:
        rank_recipe("vllm", config, 1, 0, shapes)
    msg = str(e.value)
    assert f"lacks ['{pre}.1.w1.weight', '{pre}.1.w3.weight']" in msg and "beyond num_local_experts=2" in msg
    with pytest.raises(errors.InvalidArgument, match="gives no num_local_experts"):
        rank_recipe("vllm", {**config, "num_local_experts": None}, 1, 0, shapes)
    with pytest.raises(errors.InvalidArgument, match="num_local_experts is 2.5, not a count"):
        rank_recipe("vllm", {**config, "num_local_experts": 2.5}, 1, 0, shapes)
    # a count no checkpoint has is told from the tensors' number, without listing what it would need
    with pytest.raises(errors.InvalidArgument, match="has 4 expert tensors where num_local_experts=10000000000000"):
        rank_recipe("vllm", {**config, "num_local_experts": 10**13}, 1, 0, shapes)
    # experts of one layer must be alike: a w2 of other rows would be served over bytes it does not have
    odd = {f"{pre}.{e}.w2.weight": ("BF16", (128 + e, 256)) for e in (0, 1)}
    with pytest.raises(errors.InvalidArgument, match="are not all .* alike"):
        rank_recipe("vllm", {**config, "intermediate_size": 256}, 1, 0, odd)


def test_the_swap_that_mends_an_alias_after_a_failed_drain_swap_keeps_its_layout(manager, llama, monkeypatch):
    from hotweightsd.core import faults
    from hotweightsd.core.faults import FaultPlan
    from hotweightsd.core.swap import SwapMode, swap

    manager.load("m", str(llama), version="v1", layout="vllm", alias="prod")
    monkeypatch.setattr(faults, "_plan", FaultPlan.parse("load.verify"))
    with pytest.raises(errors.InjectedFault):
        swap(manager, "prod", str(llama), version="v2", mode=SwapMode.DRAIN).run()
    monkeypatch.setattr(faults, "_plan", FaultPlan.parse(""))
    mended = swap(manager, "prod", str(llama), version="v3").run()
    assert mended.layout == "vllm" and manager.aliases() == {"prod": "m@v3"}
