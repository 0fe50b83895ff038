"""SOCKET CHECKPOINT: attaches the loaded "layered" model, checks it bit for bit against CHECKPOINT,
and checks that the compact tensor table says what the per-tensor rows say. Prints ``OK <tensors>``."""

import sys

from safetensors.torch import load_file

import hotweights
from hotweights.attach import LeaseStream
from hotweights.mapping.table import Table
from hotweights.wire.pb import pb
from support.ckpt_tools import same_bits

c = hotweights.connect(sys.argv[1])
ref = load_file(sys.argv[2])
with c.attach("layered") as w:
    assert sorted(w) == sorted(ref)
    bad = [name for name in ref if not same_bits(w[name], ref[name])]
    assert not bad, bad
    lease = LeaseStream(c.stub, "layered", "table-test", None)
    rows = c.stub.GetHandles(
        pb.GetHandlesRequest(lease_id=lease.granted.lease_id, lease_key=lease.granted.lease_key, rank=0)
    )
    cols = c.stub.GetHandles(
        pb.GetHandlesRequest(
            lease_id=lease.granted.lease_id, lease_key=lease.granted.lease_key, rank=0, compact_table=True
        )
    )
    lease.release()
    assert len(rows.tensors) == len(ref) and not cols.tensors and cols.HasField("table")
    assert Table.from_pb(cols.table).meta() == Table.from_rows(rows.tensors).meta() == w.meta
print("OK", len(ref))
