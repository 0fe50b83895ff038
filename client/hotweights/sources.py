"""What a loaded version's source tells a client: the checkpoint folder it was read from, the
``config.json`` beside it, and whether its files were written in a serving engine's layout.

The daemon reports each version's source (a folder, or one ``.safetensors`` file); the engine
integrations read these to check a version against the model they build.
"""

from __future__ import annotations

import json
from pathlib import Path

# Written beside the rank files by the offline converter to an engine's layout (python -m hotweights.vllm_layout).
ENGINE_LAYOUT_MARKER = "hotweights-layout.json"


def checkpoint_dir(source: str) -> Path | None:
    """The folder a version was loaded from; None where the daemon reports no source."""
    if not source:
        return None
    p = Path(source)
    return p.parent if p.suffix == ".safetensors" else p


def written_in_engine_layout(source: str) -> bool:
    """True where the checkpoint's files are already an engine's fused tensors (the converter's marker)."""
    d = checkpoint_dir(source)
    return d is not None and (d / ENGINE_LAYOUT_MARKER).is_file()


def config_of(source: str) -> dict | None:
    """The config.json beside the checkpoint a version was loaded from; None where there is none."""
    d = checkpoint_dir(source)
    path = d / "config.json" if d is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None
