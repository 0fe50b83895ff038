"""The CUDA driver API, lazily: checks, contexts, VMM mapping, device queries."""
