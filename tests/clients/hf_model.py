"""A serving process: builds a transformers model from the daemon's memory and checks it against
``from_pretrained`` on the same files. Prints one JSON line with what it measured.

    hf_model.py SOCKET REF CHECKPOINT_DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def mappings() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, line.strip()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("ref")
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hotweights
    from hotweights.torch import skeleton
    from hotweights.transformers import from_hotweights

    client = hotweights.connect(args.socket)
    config = AutoConfig.from_pretrained(args.checkpoint)
    # What is measured is memory that grows with the weights. The first module built in a process pays
    # one-off costs (tens of MB for torch's first meta-device kernels, the model's code): build a
    # one-layer, small-vocabulary model of the same class first, so they fall before the baseline.
    small = AutoConfig.from_pretrained(args.checkpoint, num_hidden_layers=1, vocab_size=64)
    with skeleton():
        AutoModelForCausalLM.from_config(small, dtype=small.dtype)
    if args.device == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context's host memory is not weight memory either
    # the same for the first attach's one-off costs (driver bindings, gRPC's buffers), then released
    with client.attach(args.ref):
        pass

    # Writing 5 to clear_refs resets VmHWM to the current RSS: the peak from here on is this build's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0, anon0 = status_kib("VmRSS"), status_kib("RssAnon")
    model = from_hotweights(args.ref, client=client)
    hwm = status_kib("VmHWM")

    att = model.hotweights_attachment
    dev = next(iter(att.values())).device
    out: dict = {"device": str(dev), "rss_growth_bytes": (hwm - rss0) * 1024, "tensors": len(att)}

    # Every parameter lies wholly inside one of the attachment's mappings (on the GPU: one of its regions).
    outside, params, nbytes = [], 0, 0
    if dev.type == "cpu":
        maps = [(lo, hi, line) for lo, hi, line in mappings() if "memfd:hotweights" in line]
        spans = [(lo, hi) for lo, hi, _ in maps]
        out["mapping_modes"] = sorted({line.split()[1] for _, _, line in maps})
    else:
        spans = [(r.base.data_ptr(), r.base.data_ptr() + r.size) for r in att._regions]
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        lo, n = p.data_ptr(), p.numel() * p.element_size()
        if not any(a <= lo and lo + n <= b for a, b in spans):
            outside.append(name)
        if p.requires_grad:
            outside.append(name + " (requires_grad)")
        if id(p) not in seen:
            seen.add(id(p))
            params += 1
            nbytes += n
    out["outside"] = outside
    out["params"] = params
    out["param_bytes"] = nbytes
    out["lm_head_tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 23), generator=g).to(dev)
    with torch.no_grad():
        got = model(ids).logits
    # a forward pass reads the shared pages (they count in RSS as shared memory) but copies nothing
    out["anon_growth_after_forward_bytes"] = (status_kib("RssAnon") - anon0) * 1024

    ref = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map=str(dev) if dev.type != "cpu" else None)
    with torch.no_grad():
        want = ref(ids).logits
    out["logits_equal"] = bool(torch.equal(got, want))
    out["logits_max_diff"] = float((got.float() - want.float()).abs().max())
    out["dtype"] = str(got.dtype)
    mine, theirs = dict(model.named_buffers()), dict(ref.named_buffers())
    out["buffers_equal"] = sorted(mine) == sorted(theirs) and all(
        mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine
    )
    out["param_names_equal"] = sorted(n for n, _ in model.named_parameters()) == sorted(
        n for n, _ in ref.named_parameters()
    )
    out["leases_before_release"] = len(client.status().leases)
    model.hotweights_release()
    out["leases_after_release"] = len(client.status().leases)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
