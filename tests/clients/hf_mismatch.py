"""A serving process whose model does not fit the attached tensors: prints one JSON line with the
error ``from_hotweights`` raised and the daemon's lease count after it, while this process still lives.

    hf_mismatch.py SOCKET REF [CONFIG_DIR]
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys

from hotweights.testing import wait_until


def main() -> None:
    import hotweights
    from hotweights.transformers import from_hotweights

    sock, ref = sys.argv[1], sys.argv[2]
    config = sys.argv[3] if len(sys.argv) > 3 else None
    client = hotweights.connect(sock)
    out: dict = {}
    try:
        model = from_hotweights(ref, client=client, config=config)
        out["raised"] = None
        # dropping the model ends its lease (the wait below sees it); collect in case of reference cycles
        del model
        gc.collect()
    except hotweights.HotweightsError as exc:
        out.update(
            raised=type(exc).__name__,
            message=str(exc),
            details={k: v for k, v in exc.details.items() if isinstance(v, (list, int, str))},
            is_invalid_argument=isinstance(exc, hotweights.errors.InvalidArgument),
        )
    # The error path releases synchronously; the bounded wait only tolerates the daemon's bookkeeping.
    # Past the bound the count is printed as it stands, for the test to judge.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not client.status().leases, what="the lease to end", interval=0.02)
    out["leases_after_error"] = len(client.status().leases)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
