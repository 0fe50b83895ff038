"""Checkpoint formats: safetensors headers, dtypes, checkpoint layouts, the manifest."""
