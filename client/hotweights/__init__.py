"""hotweights: attach to model weights kept resident by the node's hotweights daemon.

    import hotweights
    client = hotweights.connect()
    with client.attach("llama-70b", rank=0) as weights:   # Mapping[str, torch.Tensor], zero copy
        ...
"""

from hotweights.attach import Attachment
from hotweights.client import Client, connect
from hotweights.errors import HotweightsError

__version__ = "0.1.0"
__all__ = ["Attachment", "Client", "HotweightsError", "connect", "__version__"]
