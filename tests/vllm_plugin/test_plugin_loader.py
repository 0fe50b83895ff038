"""The vLLM plugin's loader driven without an engine: a real daemon (cpu backend) holds the versions, and
vLLM's model is stood in for by a skeleton module with vLLM's parameter names and shapes (made from the
layout's own recipe, which the engine tests check against vLLM's loaders). ``initialize_model`` and the
post-processing are patched out, so each case costs a load into the daemon, not an engine start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from support import child_env
from support.daemons import short_tmpdir, start_daemon
from support.models import save_model, tiny_llama_config

plugin = pytest.importorskip("hotweights.vllm")

import hotweights  # noqa: E402
from hotweights import errors  # noqa: E402
from hotweights import vllm_layout as layout  # noqa: E402
from hotweights.tools.shard.sharder import shard_checkpoint  # noqa: E402

ARCH = ["LlamaForCausalLM"]


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def engine_tensors(hf: Path, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """What vLLM's loaders build for ``rank`` from the Hugging Face files (the recipe the engine tests check)."""
    t = hf_tensors(hf)
    config = json.loads((hf / "config.json").read_text())
    return layout.build_rank(t.__getitem__, list(t), config, tp, rank)


class Skeleton(nn.Module):
    """A module holding ``shapes`` as parameters (and ``buffers`` as persistent buffers) under dotted names."""

    def __init__(self, shapes: dict[str, tuple], dtype: torch.dtype, buffers: dict[str, tuple] | None = None):
        super().__init__()
        for name, shape in shapes.items():
            self._owner(name).register_parameter(name.rsplit(".", 1)[1], nn.Parameter(torch.zeros(shape, dtype=dtype)))
        for name, shape in (buffers or {}).items():
            self._owner(name).register_buffer(name.rsplit(".", 1)[1], torch.ones(shape, dtype=torch.float32))

    def _owner(self, name: str) -> nn.Module:
        mod: nn.Module = self
        for part in name.split(".")[:-1]:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        return mod


def model_config(dtype=torch.bfloat16, quantization=None, qc=None):
    hf_config = SimpleNamespace(architectures=ARCH)
    if qc is not None:
        hf_config.quantization_config = qc
    return SimpleNamespace(dtype=dtype, hf_config=hf_config, quantization=quantization)


def vllm_config(device="cpu"):
    return SimpleNamespace(device_config=SimpleNamespace(device=device), model_config=model_config())


def loader_for(d, model: str, **extra):
    cfg = SimpleNamespace(
        model_loader_extra_config={"model": model, "socket": d.socket, **extra}, device=None, load_format="hotweights"
    )
    return plugin.HotweightsModelLoader(cfg)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # the daemon inherits os.environ
        root = tmp_path_factory.mktemp("loader")
        hf = save_model(tiny_llama_config(max_position_embeddings=256), root / "llama")
        sock = short_tmpdir()
        d = start_daemon(str(Path(sock) / "hw.sock"))
        d.cli("load", "hf", str(hf), check=True)
        yield d, hf, root
        code = d.stop()
        shutil.rmtree(sock, ignore_errors=True)
        assert code == 0, d.logs()


@pytest.fixture
def engine(monkeypatch):
    """Patches the plugin's engine side: the TP rank, the model vLLM would build (``make()``) and its
    post-processing; returns a setter for the TP rank and the model factory."""
    state: dict = {"tp": (0, 1), "make": None, "built": []}

    def initialize_model(**_):
        model = state["make"]()
        state["built"].append(model)
        return model

    monkeypatch.setattr(plugin, "_tp", lambda: state["tp"])
    monkeypatch.setattr(plugin, "initialize_model", initialize_model)
    monkeypatch.setattr(plugin, "process_weights_after_loading", lambda *a, **k: None)
    return state


def test_copy_mode_serves_every_tp_rank_from_an_unsplit_hugging_face_version(daemon, engine):
    """Finding 2: rank 1 of 2 attaches the version's only rank and copies its vLLM part (the daemon has no
    rank 1 of an unsplit version); the memory report answers for it too."""
    d, hf, _ = daemon
    want = engine_tensors(hf, 2, 1)
    engine["tp"] = (1, 2)
    engine["make"] = lambda: Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
    for mode in ("auto", "copy"):
        loader = loader_for(d, "hf", mode=mode)
        assert loader.get_external_weight_memory(vllm_config()) == 0  # copied: the engine's own memory
        model = loader.load_model(vllm_config(), model_config())
        assert loader.report["mode"] == "copy", loader.report
        got = dict(model.named_parameters())
        assert sorted(got) == sorted(want)
        for n, t in want.items():
            assert torch.equal(got[n], t), n
        assert not hasattr(model, "hotweights_attachment")
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def counting_connect(monkeypatch, listings: list[str], empty_first: bool = False) -> None:
    """Makes every client the plugin connects count its listings; ``empty_first``: the first listing of each
    client answers as a daemon that held nothing then would (the version loaded just after it)."""
    connect = hotweights.connect

    def counted(*a, **k):
        client = connect(*a, **k)
        real = client.list

        def listed(*la, **lk):
            listings.append("list")
            got = real(*la, **lk)
            if empty_first and len(listings) == 1:
                return type(got)(aliases=list(got.aliases))
            return got

        client.list = listed
        return client

    monkeypatch.setattr(hotweights, "connect", counted)


def test_each_call_of_the_engine_lists_the_daemons_versions_once(daemon, engine, monkeypatch):
    """The memory report, the load and a reload each take one listing of the daemon's versions and look the
    attached version up in it, rather than listing again for every lookup."""
    d, hf, _ = daemon
    want = engine_tensors(hf, 1, 0)
    engine["make"] = lambda: Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
    listings: list[str] = []
    counting_connect(monkeypatch, listings)
    loader = loader_for(d, "hf")
    assert loader.get_external_weight_memory(vllm_config()) == 0  # the Hugging Face layout: copied
    assert listings == ["list"]
    listings.clear()
    model = loader.load_model(vllm_config(), model_config())
    assert listings == ["list"] and loader.report["mode"] == "copy", (listings, loader.report)
    listings.clear()
    for p in model.parameters():
        p.data.zero_()
    loader.load_weights(model, model_config())
    assert listings == ["list"]
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n], t) for n, t in want.items())
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_a_version_missing_from_the_first_listing_is_looked_up_again(daemon, engine, monkeypatch):
    """The version attached was not in the listing taken before the attach (it loaded in between): the
    lookup lists again instead of answering without it."""
    d, hf, _ = daemon
    want = engine_tensors(hf, 1, 0)
    engine["make"] = lambda: Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
    listings: list[str] = []
    counting_connect(monkeypatch, listings, empty_first=True)
    model = loader_for(d, "hf").load_model(vllm_config(), model_config())
    assert listings == ["list", "list"], listings
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n], t) for n, t in want.items())
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_copy_mode_builds_and_copies_one_parameter_at_a_time(daemon, engine, monkeypatch):
    """Finding 4: never more than one fused tensor of the rank built at once (each real build is of one
    parameter; the all-or-nothing check runs on the meta device first)."""
    d, hf, _ = daemon
    want = engine_tensors(hf, 1, 0)
    engine["make"] = lambda: Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
    real, built = layout.build_rank, []

    def spy(*a, **k):
        out = real(*a, **k)
        if any(t.device.type != "meta" for t in out.values()):
            built.append(sorted(out))
        return out

    monkeypatch.setattr(layout, "build_rank", spy)
    released: list[bool] = []
    monkeypatch.setattr(plugin, "_release_transients", lambda: released.append(True), raising=False)
    model = loader_for(d, "hf").load_model(vllm_config(), model_config())
    assert len(built) == len(want) and all(len(b) == 1 for b in built), built
    assert released, "the transient tensors are let go as vLLM's own loader does"
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n], t) for n, t in want.items())


def test_online_quantization_is_refused_up_front(daemon, engine):
    """Finding 3: an engine given quantization=... over an unquantized model directory builds its linear
    weights on meta; the plugin says it does not support that, before building anything."""
    d, hf, _ = daemon
    engine["make"] = lambda: pytest.fail("no model is built")
    with pytest.raises(errors.InvalidArgument, match="does not support online quantization") as caught:
        loader_for(d, "hf").load_model(vllm_config(), model_config(quantization="fp8"))
    assert "quantization='fp8'" in str(caught.value)
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []


def test_copy_mode_refuses_a_parameter_left_on_meta_naming_it(daemon):
    """Finding 3: whatever leaves a parameter on meta (a quantization method that materialises its weights
    in its own loader), copy mode names it instead of reporting a copy that wrote nothing."""
    d, hf, _ = daemon
    want = engine_tensors(hf, 1, 0)
    model = Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    owner = model.get_submodule(qkv.rsplit(".", 1)[0])
    owner.weight = nn.Parameter(torch.empty(want[qkv].shape, dtype=torch.bfloat16, device="meta"))
    loader = loader_for(d, "hf")
    with hotweights.connect(d.socket) as client, client.attach("hf") as att:
        with pytest.raises(errors.BindError, match="still on the meta device") as caught:
            loader._copy_into(model, att, client, 1, 0)
    assert qkv in str(caught.value)


def _with_rotary_buffers(src: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, out)
    t = hf_tensors(src)
    for i in range(2):
        t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.arange(16, dtype=torch.float32)
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_rotary_buffers_in_the_checkpoint_are_passed_over_in_both_modes(daemon, engine):
    """Finding 7: ``rotary_emb.inv_freq`` (older conversions saved it) is skipped as vLLM's loader skips it."""
    d, hf, root = daemon
    inv = _with_rotary_buffers(hf, root / "llama-invfreq")
    d.cli("load", "inv", str(inv), check=True)
    d.cli("load", "invv", str(inv), "--layout", "vllm", check=True)
    try:
        want = engine_tensors(hf, 1, 0)
        engine["make"] = lambda: Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
        for ref, mode in (("inv", "auto"), ("invv", "copy"), ("invv", "zero_copy")):
            loader = loader_for(d, ref, mode=mode)
            model = loader.load_model(vllm_config(), model_config())
            got = dict(model.named_parameters())
            assert all(torch.equal(got[n], t) for n, t in want.items()), (ref, mode)
            assert loader.report["mode"] == ("zero_copy" if mode == "zero_copy" else "copy"), loader.report
            del model
    finally:
        d.cli("unload", "inv", "--force")
        d.cli("unload", "invv", "--force")


def test_copy_mode_fills_the_buffers_of_a_vllm_saved_checkpoint(daemon, engine):
    """Finding 8: the attention's KV-cache scales a ``save_sharded_state`` checkpoint holds are buffers:
    copy mode copies them into the engine's own, as zero copy does."""
    from safetensors.torch import save_file

    d, hf, root = daemon
    want = engine_tensors(hf, 1, 0)
    saved = root / "saved"
    saved.mkdir()
    scales = {f"model.layers.{i}.self_attn.attn._{k}_scale": torch.tensor(0.5) for i in range(2) for k in "kv"}
    tensors = {**{n: t.contiguous() for n, t in want.items()}, **scales}
    save_file(tensors, str(saved / "model-rank-0-part-0.safetensors"))
    shutil.copy(hf / "config.json", saved / "config.json")
    d.cli("load", "saved", str(saved), check=True)
    try:
        shapes = {n: tuple(t.shape) for n, t in want.items()}
        engine["make"] = lambda: Skeleton(shapes, torch.bfloat16, buffers=dict.fromkeys(scales, ()))
        loader = loader_for(d, "saved", mode="copy")
        model = loader.load_model(vllm_config(), model_config())
        buffers = dict(model.named_buffers())
        assert all(float(buffers[n]) == 0.5 for n in scales), buffers
        got = dict(model.named_parameters())
        assert all(torch.equal(got[n], t) for n, t in want.items())
    finally:
        d.cli("unload", "saved", "--force")


def test_a_failed_attach_closes_the_client(monkeypatch):
    """Finding 9: a misspelled model fails the attach; the client made for it is closed."""
    closed: list[bool] = []

    class Client:
        def list(self):
            return SimpleNamespace(aliases=[], versions=[])

        def attach(self, *a, **k):
            raise errors.NotFound("no model, version or alias named 'nope' is loaded")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(hotweights, "connect", lambda socket=None: Client())
    monkeypatch.setattr(plugin, "_tp", lambda: (0, 1))
    loader = plugin.HotweightsModelLoader(
        SimpleNamespace(model_loader_extra_config={"model": "nope"}, device=None, load_format="hotweights")
    )
    with pytest.raises(errors.NotFound):
        loader.load_model(vllm_config(), model_config())
    assert closed == [True]


def test_per_tensor_fp8_in_copy_mode_is_a_clear_error(daemon, engine):
    """Finding 10: one scale per tensor has no rows to cut; copy mode says so (InvalidArgument), not torch."""
    d, hf, root = daemon
    fp8t = root / "llama-fp8t"
    shard_checkpoint(hf, fp8t, 1, quantize="fp8", fp8_scale="tensor")
    d.cli("load", "fp8t", str(fp8t), check=True)
    try:
        want = engine_tensors(hf, 1, 0)
        model = Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
        with hotweights.connect(d.socket) as client, client.attach("fp8t") as att:
            with pytest.raises(errors.InvalidArgument, match="one scale per tensor") as caught:
                loader_for(d, "fp8t")._copy_into(model, att, client, 1, 0)
        assert "--fp8-scale channel" in str(caught.value)
    finally:
        d.cli("unload", "fp8t", "--force")


def test_an_fp32_checkpoint_is_cast_into_a_bf16_engine_in_copy_mode_only(daemon, engine):
    """Finding 11: copy mode converts as vLLM's own loader does; zero copy cannot and names both dtypes."""
    d, _, root = daemon
    f32 = save_model(tiny_llama_config(max_position_embeddings=256), root / "llama-f32", dtype="float32")
    d.cli("load", "f32", str(f32), check=True)
    d.cli("load", "f32v", str(f32), "--layout", "vllm", check=True)
    try:
        want = engine_tensors(f32, 1, 0)
        engine["make"] = lambda: Skeleton({n: tuple(t.shape) for n, t in want.items()}, torch.bfloat16)
        for ref in ("f32", "f32v"):
            model = loader_for(d, ref, mode="copy").load_model(vllm_config(), model_config())
            got = dict(model.named_parameters())
            assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in want.items()), ref
        with pytest.raises(errors.BindError) as caught:
            loader_for(d, "f32v", mode="zero_copy").load_model(vllm_config(), model_config())
        assert "dtype: checkpoint torch.float32, engine torch.bfloat16" in str(caught.value)
    finally:
        d.cli("unload", "f32", "--force")
        d.cli("unload", "f32v", "--force")


@pytest.mark.parametrize(
    ("extra", "key"),
    [({"model": "m", "socket": 5}, "socket"), ({"model": ["m"]}, "model"), ({"model": "m", "socket": ""}, "socket")],
)
def test_extra_config_values_must_be_strings(extra, key):
    """Finding 13: a wrong type is an InvalidArgument naming the key, not a TypeError or a lookup of "['m']"."""
    cfg = SimpleNamespace(model_loader_extra_config=extra, device=None, load_format="hotweights")
    with pytest.raises(errors.InvalidArgument, match=f"model_loader_extra_config\\[{key!r}\\]"):
        plugin.HotweightsModelLoader(cfg)


def test_host_memory_is_not_reported_as_gpu_memory_nor_bound_to_a_gpu_model(daemon, engine):
    """A daemon with the cpu backend on a GPU node holds host memory: the memory report leaves nothing out
    of a GPU engine's budget for it, and zero copy onto the GPU model is refused naming both devices."""
    d, hf, _ = daemon
    d.cli("load", "hfv", str(hf), "--layout", "vllm", check=True)
    try:
        assert loader_for(d, "hfv").get_external_weight_memory(vllm_config("cpu")) > 0
        assert loader_for(d, "hfv").get_external_weight_memory(vllm_config("cuda")) == 0
        engine["make"] = lambda: pytest.fail("no model is built")
        with pytest.raises(errors.InvalidArgument, match="host memory") as caught:
            loader_for(d, "hfv", mode="zero_copy").load_model(vllm_config("cuda"), model_config())
        assert "cuda" in str(caught.value)
    finally:
        d.cli("unload", "hfv", "--force")
    assert d.wait_status(lambda st: not st["leases"])["leases"] == []
