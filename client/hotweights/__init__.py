"""hotweights: attach to model weights kept resident by the node's hotweights daemon.

    import hotweights
    client = hotweights.connect()
    with client.attach("llama-70b", rank=0) as weights:   # Mapping[str, torch.Tensor], zero copy
        ...

Names load on first use: the daemon's core imports the shared modules (errors, checkpoint
reader) without pulling in gRPC, and the CLI starts without torch.
"""

from hotweights.errors import HotweightsError

__version__ = "0.1.0"
__all__ = ["Attachment", "Client", "HotweightsError", "connect", "__version__"]


def __getattr__(name: str):
    if name in ("Client", "connect"):
        from hotweights import client

        return getattr(client, name)
    if name == "Attachment":
        from hotweights.attach import Attachment

        return Attachment
    raise AttributeError(f"module 'hotweights' has no attribute {name!r}")
