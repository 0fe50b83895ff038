"""The client's tensor table and the tensors built from it, without a daemon."""

from __future__ import annotations

import random

import pytest
import torch

from hotweights import errors
from hotweights.mapping.table import Table, TensorMeta, _slow_view, _stacked_span, build_tensors
from hotweights.wire.pb import pb

DTYPES = [
    ("BF16", "bfloat16", 2),
    ("F32", "float32", 4),
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("U8", "uint8", 1),
    ("I8", "int8", 1),
    ("F8_E8M0", "uint8", 1),
]


def one_by_one(table: Table, bases: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plainest construction: slice each tensor's bytes and view them."""
    return {
        name: _slow_view(bases[a], off, nb, shape, served, dtype)
        for name, a, served, off, shape, dtype, nb in zip(
            table.names, table.allocations, table.served, table.offsets, table.shapes, table.dtypes, table.nbytes
        )
    }


def random_layout(rng: random.Random) -> tuple[Table, list[torch.Tensor]]:
    """Layers of repeated shapes (some shared between roles), sometimes over two allocations, padded
    or not, in layout order or shuffled: the stacked path and the one-by-one path both get exercised."""
    dtype, served, size = rng.choice(DTYPES)
    roles = [rng.choice([(4, 8), (8,), (2, 8), (4, 8), (), (0, 3)]) for _ in range(rng.randint(1, 6))]
    two = rng.random() < 0.3
    pad = rng.choice([0, 0, size, 3 * size, 256])
    metas, off = [], [0, 0]
    for layer in range(rng.randint(1, 12)):
        for r, shape in enumerate(roles):
            a = rng.choice([0, 1]) if two else 0
            n = size
            for d in shape:
                n *= d
            metas.append(TensorMeta(f"l{layer}.r{r}", dtype, served, shape, a, off[a], n))
            off[a] += n + (rng.choice([0, pad]) if rng.random() < 0.2 else pad)
    if rng.random() < 0.5:
        rng.shuffle(metas)
    bases = [
        torch.randint(0, 256, (o + 64,), dtype=torch.uint8, generator=torch.Generator().manual_seed(o)) for o in off
    ]
    return Table.from_rows(metas), bases


@pytest.mark.parametrize("seed", range(40))
def test_built_tensors_equal_one_by_one_views(seed):
    rng = random.Random(seed)
    for _ in range(8):
        table, bases = random_layout(rng)
        got, want = build_tensors(table, bases), one_by_one(table, bases)
        assert got.keys() == want.keys()
        for name, w in want.items():
            g = got[name]
            assert (g.dtype, g.shape, g.stride()) == (w.dtype, w.shape, w.stride()), name
            assert g.data_ptr() == w.data_ptr(), name  # the same bytes, not a copy
            assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize(
    "elems,span",
    [
        ([0, 10, 20, 30], (0, 4, 1)),
        ([0, 3, 10, 13, 20, 23], (0, 6, 2)),  # two roles of one shape per layer
        ([0, 10, 20, 30, 35], (0, 4, 1)),  # a final norm after the layers' norms
        ([1, 100, 110, 120, 130], (1, 5, 1)),  # an embedding before them
        ([0, 10, 21, 30], (0, 0, 0)),  # no even step
        ([0, 10, 20], (0, 0, 0)),  # too few to be worth a stack
    ],
)
def test_stacked_span(elems, span):
    assert _stacked_span(elems) == span


def test_table_from_pb_matches_rows():
    rows = [
        pb.TensorInfo(name="a", dtype="BF16", served_dtype="bfloat16", shape=[2, 3], allocation=0, offset=0, nbytes=12),
        pb.TensorInfo(name="s", dtype="F32", served_dtype="float32", shape=[], allocation=1, offset=256, nbytes=4),
        pb.TensorInfo(name="v", dtype="I8", served_dtype="int8", shape=[5], allocation=0, offset=512, nbytes=5),
    ]
    compact = pb.TensorTable(
        name=["a", "s", "v"],
        dtype=["BF16", "F32", "I8"],
        served_dtype=["bfloat16", "float32", "int8"],
        allocation=[0, 1, 0],
        offset=[0, 256, 512],
        nbytes=[12, 4, 5],
        ndim=[2, 0, 1],
        dims=[2, 3, 5],
    )
    assert Table.from_pb(compact).meta() == Table.from_rows(rows).meta()
    assert Table.from_pb(compact).meta()["s"].shape == ()


def test_malformed_table_is_refused_with_the_reason():
    with pytest.raises(errors.Internal, match="ndim adds up to 3 but 2 dims were sent"):
        Table.from_pb(
            pb.TensorTable(
                name=["a"],
                dtype=["BF16"],
                served_dtype=["bfloat16"],
                allocation=[0],
                offset=[0],
                nbytes=[12],
                ndim=[3],
                dims=[2, 3],
            )
        )
    with pytest.raises(errors.Internal, match="columns differ in length"):
        Table.from_pb(
            pb.TensorTable(
                name=["a", "b"],
                dtype=["BF16"],
                served_dtype=["bfloat16"],
                allocation=[0],
                offset=[0],
                nbytes=[12],
                ndim=[1],
                dims=[6],
            )
        )
