"""hotweightsd: the node-local daemon that keeps model weights resident and hands them out."""

__version__ = "0.1.0"
