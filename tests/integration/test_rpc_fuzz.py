"""Hardening: no request gets an INTERNAL (or UNKNOWN) status.

One real daemon (cpu backend) serves the module; each RPC goes to the socket of its role (operator RPCs
to ``<socket>.admin``), and every operator RPC sent to the readers' socket must be refused as
``OperatorRequired`` whatever the request. For every RPC, hypothesis builds request messages
from the protobuf descriptors (every field, by type: odd and huge strings, paths, out-of-range and
unknown enum numbers, negative ints, bytes, repeated and nested fields), sends them over a raw gRPC
channel with the generated stubs and asserts that each call ends OK or with a typed status: a code
other than INTERNAL and UNKNOWN that carries the error class in its trailing metadata. Watch never
ends by itself and an open Lease stream may wait: those two run under a short deadline that the test
sets on purpose, so their DEADLINE_EXCEEDED (from the client) is expected. Error messages must not
echo a huge client string back. Besides what hypothesis draws, each RPC always gets the known bad
inputs (``_examples``): unknown enum numbers, NUL bytes and over-long names in paths, nested JSON in
headers, indexes and manifests, malformed Lease streams. FUZZ_DEBUG=1 prints every refusal.
Afterwards the daemon must still answer Status, hold no more fds than before, not have grown much,
have logged no internal error, and have answered every RPC (OK and typed refusals both).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import CLASS_KEY
from hotweightsd.core.roles import MINIMUM_ROLE, Role, minimum_role
from support.ckpt_tools import raw_file, write_model
from support.daemons import Daemon, short_tmpdir, start_daemon

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
UNARY_TIMEOUT = 30.0  # generous: a loaded CI machine is slow, and no unary call should wait on anything
STREAM_CUT = 1.5  # the deadline that ends lingering Lease streams on purpose
WATCH_CUT = 0.5  # and every Watch: it only ends by an error (its one field is a free-form ref)
LOAD_TIMEOUT = 60.0
HUGE = 70_000  # characters: well past any sane name, well under gRPC's message limits
MAX_ERROR_CHARS = 4_000  # an error message quoting client strings by prefix stays far below this

STATE: dict[str, Any] = {}
SERVICE = pb.DESCRIPTOR.services_by_name["Hotweights"]


def _int_range(t: int) -> tuple[int, int]:
    f = FieldDescriptor
    return {
        f.TYPE_INT32: (-(2**31), 2**31 - 1),
        f.TYPE_SINT32: (-(2**31), 2**31 - 1),
        f.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
        f.TYPE_UINT32: (0, 2**32 - 1),
        f.TYPE_FIXED32: (0, 2**32 - 1),
        f.TYPE_INT64: (-(2**63), 2**63 - 1),
        f.TYPE_SINT64: (-(2**63), 2**63 - 1),
        f.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
        f.TYPE_UINT64: (0, 2**64 - 1),
        f.TYPE_FIXED64: (0, 2**64 - 1),
    }[t]


# first ones first: hypothesis draws the first entries of a list most often
NAMES = ["n1", "n2", "m", "a"]
ALIASES = ["b", "a", "c", "m"]
REFS = ["m@v1", "a", "n1", "b", "m", "n2", "n1@v1", "ghost", "m@v9"]


def _meaningful(field: str) -> st.SearchStrategy[str] | None:
    """Values that get a request past name validation, by the field's name (a random string seldom does)."""
    keys = ("good", "dir", "bad", "deep", "deepidx", "deepman")
    keys += ("cfgdeep", "cfgjunk", "cfgtypes", "cfgnan", "cfgllama", "cfgmoe")
    paths = [STATE[k] for k in keys] + ["/dev/null", "/nope"]
    return {
        "name": st.sampled_from(NAMES),
        "alias": st.sampled_from(ALIASES),
        "version": st.sampled_from(["v1", "v2", "v3"]),
        "ref": st.sampled_from(REFS),
        "target": st.sampled_from(REFS + paths),
        "path": st.sampled_from(paths),
        # mostly none: a layout is refused for most of the fuzz's checkpoints (no config.json, or a bad one)
        "layout": st.sampled_from(["", "", "", "vllm", "none"]),
    }.get(field)


def _strings(field: str) -> st.SearchStrategy[str]:
    """Names the daemon knows, paths good and bad, odd unicode and huge strings."""

    def known() -> list[str]:
        return [
            "",
            "m",
            "m@v1",
            "a",
            "ghost",
            "ghost@v9",
            "m@",
            "@v1",
            "@",
            "m@v1@v2",
            ".",
            "..",
            "/",
            "../../etc/passwd",
            "/dev/null",
            "/dev/zero",
            "/proc/self/status",
            "/nonexistent/x.safetensors",
            "\x00",
            "m\x00evil",
            "\u202e\u200b\ufeff",
            "\U0001f600" * 10,
            " m ",
            "m\n",
            STATE["good"],
            STATE["dir"],
            STATE["bad"],
            STATE["deep"],
            STATE["deepidx"],
            STATE["deepman"],
        ]

    odd = st.one_of(
        st.sampled_from(known()),
        st.text(max_size=40),
        st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600", "/"]), st.just(HUGE)),
        st.builds(lambda s: STATE["dir"] + "/" + s, st.text(max_size=20)),
    )
    meaningful = _meaningful(field)
    return odd if meaningful is None else _mostly(meaningful, odd)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four: each field valid often enough that a request gets to the checks
    behind the first one."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 3 else good)


def _field(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    T = FieldDescriptor
    t = f.type
    one: st.SearchStrategy[Any]
    if t == T.TYPE_STRING:
        one = _strings(f.name)
    elif t == T.TYPE_BYTES:
        one = st.one_of(st.binary(max_size=80), st.just(b"\xff" * HUGE))
    elif t == T.TYPE_BOOL:
        one = st.booleans()
    elif t in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        one = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64 if t == T.TYPE_DOUBLE else 32))
    elif t == T.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values]
        unknown = st.one_of(
            st.sampled_from([max(numbers) + 1, 99, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
        )
        one = _mostly(st.sampled_from(numbers), unknown)
    elif t == T.TYPE_MESSAGE:
        one = _message(f.message_type, depth + 1)
    else:
        lo, hi = _int_range(t)
        one = st.one_of(st.sampled_from([0, 1, -1 if lo < 0 else 2, lo, hi, 7, 1000]), st.integers(lo, hi))
    if f.is_repeated:
        return _mostly(st.lists(one, max_size=1), st.lists(one, max_size=5))
    return one


def _message(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of type ``desc`` with any subset of their fields set (oneofs: whichever is set last)."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields = {f.name: _field(f, depth) for f in desc.fields}

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for name in draw(st.permutations(sorted(fields))):
            if draw(st.integers(0, 3)) == 3:
                continue  # unset: a quarter of the time (hypothesis favours small numbers: 0 is "set")
            value = draw(fields[name])
            f = desc.fields_by_name[name]
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                if f.is_repeated:
                    getattr(msg, name).extend(value)
                else:
                    getattr(msg, name).CopyFrom(value)
            elif f.is_repeated:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg

    return build()


def _check(rpc: str, err: grpc.RpcError, cut_on_purpose: bool = False) -> None:
    code = err.code()
    meta = dict(err.trailing_metadata() or ())
    msg = err.details() or ""
    if cut_on_purpose and code == grpc.StatusCode.DEADLINE_EXCEEDED and CLASS_KEY not in meta:
        return
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), f"{rpc}: {code.name}: {msg[:2000]}"
    assert CLASS_KEY in meta, f"{rpc}: {code.name} without a hotweights error class (transport?): {msg[:2000]}"
    assert len(msg) <= MAX_ERROR_CHARS, f"{rpc}: {len(msg)}-character error message: {msg[:300]}…"


def _call(rpc: str, fn: Any, cut_on_purpose: bool = False) -> None:
    code = "OK"
    try:
        fn()
    except grpc.RpcError as err:
        _check(rpc, err, cut_on_purpose)
        code = err.code().name
        if os.environ.get("FUZZ_DEBUG"):
            print(rpc, code, (err.details() or "")[:150])
    seen = STATE.setdefault("seen", {}).setdefault(rpc, {})
    seen[code] = seen.get(code, 0) + 1


class Routed:
    """Each RPC on the socket of its role: the operator socket for what needs an operator (the table
    in hotweightsd.core.roles), the readers' socket for the rest."""

    def __init__(self, reader: Any, operator: Any) -> None:
        self._reader, self._operator = reader, operator

    def __getattr__(self, rpc: str) -> Any:
        return getattr(self._operator if minimum_role(rpc) == Role.OPERATOR else self._reader, rpc)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[Daemon, Any]]:
    d = short_tmpdir()
    daemon = start_daemon(os.path.join(d, "hw.sock"))
    try:
        good = write_model(Path(d) / "good" / "g.safetensors")
        bad = raw_file(Path(d) / "bad.safetensors", b"{not json", b"")
        deep = raw_file(Path(d) / "deep.safetensors", b"[" * 200_000 + b"]" * 200_000, b"")
        deepidx = Path(d) / "deepidx"
        raw_file(
            deepidx / "model-00001.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
        )
        (deepidx / "model.safetensors.index.json").write_text("[" * 200_000 + "]" * 200_000)
        deepman = Path(d) / "deepman"
        write_model(deepman / "model-rank-0-part-0.safetensors")
        (deepman / "hotweights.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
        # config.json beside good files, for the layout's reading of it: nested past any parser's depth,
        # not JSON, of the wrong types, NaN, and a Llama whose tensors are not a Llama's
        configs = {
            "cfgdeep": "[" * 200_000 + "]" * 200_000,
            "cfgjunk": "{not json",
            "cfgtypes": '{"architectures": 5, "num_attention_heads": "x", "vocab_size": [1]}',
            "cfgnan": '{"architectures": ["LlamaForCausalLM"], "num_attention_heads": NaN, "vocab_size": Infinity}',
            "cfgllama": '{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "hidden_size": 64, '
            '"vocab_size": 500, "intermediate_size": 128}',
        }
        for key, text in configs.items():
            STATE[key] = str(write_model(Path(d) / key / "model.safetensors").parent)
            (Path(d) / key / "config.json").write_text(text)
        # one expert beside a config naming 10^13 of them
        expert = {"model.layers.0.block_sparse_moe.experts.0.w2.weight": torch.zeros(64, 32)}
        STATE["cfgmoe"] = str(write_model(Path(d) / "cfgmoe" / "model.safetensors", expert).parent)
        (Path(d) / "cfgmoe" / "config.json").write_text(
            '{"architectures": ["MixtralForCausalLM"], "num_attention_heads": 4, "hidden_size": 64, '
            '"vocab_size": 512, "intermediate_size": 128, "num_local_experts": 10000000000000}'
        )
        STATE.update(good=str(good), dir=d, bad=str(bad), deep=str(deep), deepidx=str(deepidx), deepman=str(deepman))
        channel = grpc.insecure_channel(f"unix://{daemon.socket}")
        operator_channel = grpc.insecure_channel(f"unix://{daemon.socket}.admin")
        STATE["reader"] = reader = pb_grpc.HotweightsStub(channel)
        stub = Routed(reader, pb_grpc.HotweightsStub(operator_channel))
        _restore(stub)
        STATE["fds"] = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        STATE["rss"] = _rss(daemon.pid)
        try:
            yield daemon, stub
        finally:
            channel.close()
            operator_channel.close()
    finally:
        code = daemon.stop()
        shutil.rmtree(d, ignore_errors=True)
    assert code == 0, f"daemon exited with {code}:\n{daemon.logs()}"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _restore(stub: Any) -> None:
    """Puts m@v1 and alias a back if a fuzzed Unload or SetAlias took them away."""
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=UNARY_TIMEOUT)
    if not any(v.name == "m" and v.version == "v1" for v in listed.versions):
        request = pb.LoadModelRequest(name="m", path=STATE["good"], version="v1", wait=True)
        list(stub.LoadModel(request, timeout=LOAD_TIMEOUT))
    stub.SetAlias(pb.SetAliasRequest(alias="a", target="m@v1", create=True), timeout=UNARY_TIMEOUT)


def _examples(rpc: str) -> list[Any]:
    """The known bad inputs, always tried besides what hypothesis draws (a random draw seldom gets
    past name validation to the path, enum and lease checks)."""
    good, huge = STATE["good"], "x" * HUGE
    nan, inf = float("nan"), float("inf")
    load = pb.LoadModelRequest
    swap = pb.SwapModelRequest
    return {
        "LoadModel": [
            load(name="n1", path=good, allocation=3),
            load(name="n1", path=good, verify=99),
            load(name="n1", path=good, verify=-1, wait=True),
            load(name="n1", path="a/\0b.safetensors"),
            load(name="n1", path=huge),
            load(name="n1", path="/" + "d" * 300 + "/x.safetensors"),
            load(name="n1", path="~nosuchuser0/x.safetensors"),
            load(name="n1", path=STATE["deep"]),
            load(name="n1", path=STATE["deepidx"]),
            load(name="n1", path=STATE["deepman"], verify=pb.VERIFY_FAST),
            load(name="n1", path="/dev/null"),
            load(name="n1", path=good, device_map=[5]),
            load(name="n1", path=good, device_map=[0, 0]),
            load(name=huge, path=good),
            load(name="n1", path=good, alias=huge),
            load(name="n1", path=good, version=huge),
        ],
        "SwapModel": [
            swap(alias="a", target="m@v1", mode=7),
            swap(alias="a", target="m@v1", mode=-1),
            swap(alias="a", target="m@v1", drain_timeout_seconds=nan),
            swap(alias="a", target="m@v1", drain_timeout_seconds=-inf),
            swap(alias="a", target=good, verify=42),
            swap(alias="b", target="\0"),
            swap(alias="a", target=huge),
            swap(alias=huge, target="m@v1"),
            swap(alias="b", target="a/\0b", name="n2"),
            swap(alias="a", target="m@v1", keep_previous=5),
            swap(alias="ghost", target="m@v1"),
            swap(alias="b", target="m@v1", create=True, keep_previous=pb.KEEP_PREVIOUS_YES),
            swap(alias="a", target=good, mode=pb.SWAP_DRAIN, keep_previous=pb.KEEP_PREVIOUS_YES),
        ],
        "Lease": [
            [pb.LeaseRequest()],
            [pb.LeaseRequest(release=pb.LeaseRelease())],
            [pb.LeaseRequest(open=pb.LeaseOpen(ref=huge))],
            [pb.LeaseRequest(open=pb.LeaseOpen(ref="a", with_handles=True, rank=-1))],
            [pb.LeaseRequest(open=pb.LeaseOpen(ref="m", with_handles=True, rank=2**31 - 1, compact_table=True))],
            [pb.LeaseRequest(open=pb.LeaseOpen(ref="m@v1", pid=-1, holder=huge)), pb.LeaseRequest()],
            [pb.LeaseRequest(open=pb.LeaseOpen(ref="a")), pb.LeaseRequest(open=pb.LeaseOpen(ref=huge))],
        ],
        "GetHandles": [pb.GetHandlesRequest(lease_id=huge), pb.GetHandlesRequest(lease_id="\0", rank=-1)],
        "UnloadModel": [pb.UnloadModelRequest(ref=huge), pb.UnloadModelRequest(ref="ghost@" + huge)],
        "SetAlias": [
            pb.SetAliasRequest(alias="b", target="m@v9"),
            pb.SetAliasRequest(alias=huge, target="m@v1"),
            pb.SetAliasRequest(alias="b", target=huge),
            pb.SetAliasRequest(alias=huge),
            pb.SetAliasRequest(alias="b"),
            pb.SetAliasRequest(alias="ghost", target="m@v1"),
            pb.SetAliasRequest(alias="a", target="m@v1", remove=True),
            pb.SetAliasRequest(alias=huge, remove=True),
            pb.SetAliasRequest(alias="a", target="m@v1"),  # valid: an OK answer whatever hypothesis draws
        ],
        "Rollback": [
            pb.RollbackRequest(),
            pb.RollbackRequest(alias="a"),
            pb.RollbackRequest(alias="ghost"),
            pb.RollbackRequest(alias=huge),
            pb.RollbackRequest(alias="\0"),
        ],
        "Watch": [pb.WatchRequest(ref=huge)],
    }.get(rpc, [])


def _with_examples(rpc: str, test: Any) -> Any:
    for ex in _examples(rpc):
        test = example(ex)(test)
    return test


UNARY = ["UnloadModel", "ListModels", "GetHandles", "Status", "SetAlias", "Rollback"]


def _answer(reply: Any) -> Any:
    return reply


# (rpc, what takes its answer, its deadline): a unary call's reply, or every message of a load's stream
CALLS = [(rpc, _answer, UNARY_TIMEOUT) for rpc in UNARY] + [
    (rpc, list, LOAD_TIMEOUT) for rpc in ("LoadModel", "SwapModel")
]


@pytest.mark.parametrize(("rpc", "consume", "timeout"), CALLS, ids=[rpc for rpc, _, _ in CALLS])
def test_rpcs_answer_typed_statuses(fuzzed, rpc, consume, timeout):
    daemon, stub = fuzzed
    _restore(stub)
    desc = pb.DESCRIPTOR.services_by_name["Hotweights"].methods_by_name[rpc].input_type

    @SETTINGS
    @given(_message(desc))
    def run(request):
        _call(rpc, lambda: consume(getattr(stub, rpc)(request, timeout=timeout)))

    _with_examples(rpc, run)()
    assert daemon.alive()


def test_watch_answers_typed_statuses(fuzzed):
    daemon, stub = fuzzed

    @settings(SETTINGS, max_examples=15)
    @given(_message(pb.WatchRequest.DESCRIPTOR))
    def run(request):
        _call("Watch", lambda: list(stub.Watch(request, timeout=WATCH_CUT)), cut_on_purpose=True)

    _with_examples("Watch", run)()
    assert daemon.alive()


def test_lease_streams_answer_typed_statuses(fuzzed):
    """Any sequence of LeaseRequests, malformed ones included (no oneof set, release first, several
    opens, huge refs, odd ranks with handles)."""
    daemon, stub = fuzzed
    _restore(stub)

    @SETTINGS
    @given(st.lists(_message(pb.LeaseRequest.DESCRIPTOR), max_size=4))
    def run(requests):
        _call("Lease", lambda: list(stub.Lease(iter(requests), timeout=STREAM_CUT)), cut_on_purpose=True)

    _with_examples("Lease", run)()
    assert daemon.alive()


OPERATOR_RPCS = [m.name for m in SERVICE.methods if MINIMUM_ROLE.get(m.name, Role.OPERATOR) == Role.OPERATOR]


@pytest.mark.parametrize("rpc", OPERATOR_RPCS)
def test_the_readers_socket_refuses_every_operator_rpc(fuzzed, rpc):
    """Whatever the request, an operator RPC on the readers' socket is PERMISSION_DENIED with
    OperatorRequired, and nothing changes."""
    daemon, stub = fuzzed
    _restore(stub)
    before = stub.ListModels(pb.ListModelsRequest(), timeout=UNARY_TIMEOUT)
    method = SERVICE.methods_by_name[rpc]
    reader = STATE["reader"]

    @settings(SETTINGS, max_examples=15)
    @given(_message(method.input_type))
    def run(request):
        with pytest.raises(grpc.RpcError) as info:
            answer = getattr(reader, rpc)(request, timeout=UNARY_TIMEOUT)
            if method.server_streaming:
                list(answer)
        err = info.value
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (rpc, err.code(), err.details())
        assert dict(err.trailing_metadata())[CLASS_KEY] == "OperatorRequired"
        assert f"{daemon.socket}.admin" in (err.details() or "")

    _with_examples(rpc, run)()
    assert stub.ListModels(pb.ListModelsRequest(), timeout=UNARY_TIMEOUT) == before
    assert daemon.alive()


def test_daemon_survives_the_fuzz(fuzzed):
    daemon, stub = fuzzed
    _restore(stub)
    st_ = stub.Status(pb.StatusRequest(), timeout=UNARY_TIMEOUT)
    assert st_.pid == daemon.pid
    # what the fuzz loaded under other names goes, so that fds compare with the start
    for v in st_.versions:
        if v.name != "m":
            _call("UnloadModel", lambda: stub.UnloadModel(pb.UnloadModelRequest(ref=v.name, force=True)))
    daemon.wait_status(lambda s: s["leases"] == [] and {v["name"] for v in s["versions"]} == {"m"}, timeout=60)
    fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    assert fds <= STATE["fds"] + 8, f"{fds} fds now, {STATE['fds']} before the fuzz"
    assert "rpc.internal_error" not in daemon.logs()
    # the fuzz was not vacuous: every RPC was called, and answered both OK and typed refusals
    seen = STATE["seen"]
    assert set(seen) >= set(UNARY) | {
        "LoadModel",
        "SwapModel",
        "Watch",
        "Lease",
    }, seen
    for rpc in ("LoadModel", "SwapModel", "SetAlias", "UnloadModel", "GetHandles", "Lease", "Rollback"):
        assert "INVALID_ARGUMENT" in seen[rpc] or "NOT_FOUND" in seen[rpc], (rpc, seen[rpc])
    assert "FAILED_PRECONDITION" in seen["Rollback"], seen["Rollback"]  # an alias with nothing kept
    answered_ok = {rpc for rpc, codes in seen.items() if "OK" in codes}
    assert {"SetAlias", "Lease"} <= answered_ok and {"LoadModel", "SwapModel"} & answered_ok, seen
    grown = _rss(daemon.pid) - STATE["rss"]
    assert grown < 512 * 2**20, f"the daemon grew by {grown / 2**20:.0f} MiB during the fuzz"
