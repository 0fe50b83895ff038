"""A serving process that writes into a bound parameter, as an optimizer step or a stray in-place op would.

    write_bound.py SOCKET REF

Prints one JSON line with a digest of the parameter's bytes before the write, then writes in place. The write must not
return: the attachment is a read-only mapping, so the process dies of SIGSEGV. Printing ``WROTE`` means it
went through.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys

import torch

import hotweights
from hotweights.transformers import from_hotweights


def main() -> None:
    sock, ref = sys.argv[1], sys.argv[2]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the expected crash leaves no core file behind
    model = from_hotweights(ref, client=hotweights.connect(sock))
    p = model.get_input_embeddings().weight
    digest = hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    print(json.dumps({"param": "embed_tokens", "sha256": digest}), flush=True)
    with torch.no_grad():
        p.add_(1)
    print("WROTE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
