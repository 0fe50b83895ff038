"""Stage 1, offline: split a Hugging Face checkpoint for tensor parallelism, optionally into FP8.

``shard_checkpoint`` is the entry point; ``rules`` holds the per-architecture split rules,
``placement`` turns them into a complete plan before any data is read, ``writer`` streams the
parts, ``quantize`` and ``prequant`` handle FP8 output and already-quantized sources.
"""

from hotweights.tools.shard.sharder import ShardResult, shard_checkpoint

__all__ = ["ShardResult", "shard_checkpoint"]
