"""A vLLM serving process: greedy tokens for three prompts with the top logprobs of each step,
per-parameter checksums, where each parameter's memory lies and the bytes the loader says stay
outside the engine's budget. Prints one JSON line.

    vllm_generate.py MODEL_DIR [--load-format hotweights --extra JSON] [--processes] [--save-sharded DIR]

The engine runs in this process (no engine-core or worker subprocesses) so that the parameters can
be inspected here; the loader is the same one a multi-process engine uses. ``--processes`` runs the
engine core in its own process, as ``vllm serve`` does (the loader registered there by the entry point
alone): only tokens, checksums and the daemon's leases seen while the engine lives are reported.
"""

from __future__ import annotations

import argparse
import json
import os

PROMPTS = [[1, 5, 9, 33, 70], [2, 7], [11, 400, 3, 3, 3, 250, 17]]
TOP = 3  # logprobs kept per step: enough to see both sides of a near-tie
BEFORE_POSTPROCESSING: dict[str, str] = {}
ALIASED_BEFORE_POSTPROCESSING: list[str] = []  # bound to the daemon's mapping as the loader left them


def record_before_postprocessing(save_to: str = "") -> None:
    """Digests of every parameter as the loader left it, before vLLM's post-processing.

    On the CPU, post-processing repacks every linear weight into the kernels' own format and empties
    the parameter, so the engine's own checksums cannot see whether q|k|v and gate|up were laid out
    right; these can. Both loaders call ``process_weights_after_loading`` by the name they imported.
    """
    import hashlib

    import torch
    import vllm.model_executor.model_loader.base_loader as base

    import hotweights.vllm as plugin

    original = base.process_weights_after_loading

    def wrapped(model, model_config, target_device):
        if save_to:
            # what vLLM's save_sharded_state writes on a GPU, where post-processing leaves unquantized
            # weights as they are (on the CPU it repacks them, so the engine's own save would be empty)
            from vllm.model_executor.model_loader import ShardedStateLoader

            ShardedStateLoader.save_model(model, save_to)
        spans = _daemon_spans()
        for name, p in model.named_parameters():
            data = p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            BEFORE_POSTPROCESSING[name] = f"{tuple(p.shape)}:{hashlib.sha256(data).hexdigest()}"
            if _inside(p, spans):
                ALIASED_BEFORE_POSTPROCESSING.append(name)
        return original(model, model_config, target_device)

    base.process_weights_after_loading = wrapped
    plugin.process_weights_after_loading = wrapped


def mappings() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            out.append((lo, hi, line.strip()))
    return out


def _daemon_spans() -> list[tuple[int, int]]:
    return [(lo, hi) for lo, hi, line in mappings() if "memfd:hotweights" in line]


def _inside(p, spans: list[tuple[int, int]]) -> bool:
    lo = p.data_ptr()
    hi = lo + p.numel() * p.element_size()
    return p.numel() > 0 and any(a <= lo and hi <= b for a, b in spans)


def where_params(worker) -> dict:
    model = worker.model_runner.model
    spans = _daemon_spans()
    aliased, own, emptied = [], [], []
    for name, p in model.named_parameters():
        if p.numel() == 0:
            emptied.append(name)  # vLLM's CPU kernels repacked it into their own memory
            continue
        (aliased if _inside(p, spans) else own).append(name)
    return {
        "aliased": aliased,
        "own": own,
        "emptied": emptied,
        "holds_attachment": hasattr(model, "hotweights_attachment"),
    }


def external_weight_memory(worker) -> int:
    """What the loader tells vLLM's GPU worker before it sizes its budget (the CPU worker does not ask)."""
    from vllm.model_executor.model_loader import get_model_loader

    return get_model_loader(worker.vllm_config.load_config).get_external_weight_memory(worker.vllm_config)


def leases(extra: str) -> list[dict]:
    """The daemon's leases now (the engine alive): who holds them."""
    import hotweights

    with hotweights.connect(json.loads(extra).get("socket")) as client:
        return [{"ref": f"{x.name}@{x.version}", "pid": x.pid, "holder": x.holder} for x in client.status().leases]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--processes", action="store_true")
    ap.add_argument("--save-sharded", default="", help="also write the loaded model with vLLM's ShardedStateLoader")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.processes else "0"

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if not args.processes:
        record_before_postprocessing(args.save_sharded)
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        model_loader_extra_config=json.loads(args.extra),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=128,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        gpu_memory_utilization=0.1,
        distributed_executor_backend="uni",
        seed=0,
    )
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=12, logprobs=TOP),
        use_tqdm=False,
    )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    # JSON keys are strings: token ids as text
    logprobs = [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    checksums = llm.collective_rpc("compute_weight_checksums")[0]
    if args.processes:
        seen = {"pid": os.getpid(), "leases": leases(args.extra)}
        print(json.dumps({"tokens": tokens, "logprobs": logprobs, "checksums": checksums, **seen}))
        return
    result = {
        "tokens": tokens,
        "logprobs": logprobs,
        "checksums": checksums,
        "params": llm.collective_rpc(where_params)[0],
        "external_weight_memory": llm.collective_rpc(external_weight_memory)[0],
        "before_postprocessing": BEFORE_POSTPROCESSING,
        "aliased_before_postprocessing": ALIASED_BEFORE_POSTPROCESSING,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
