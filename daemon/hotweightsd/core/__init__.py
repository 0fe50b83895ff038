"""The daemon's core: registry, leases, admission, layouts and the MemoryBackend protocol.

Nothing here imports gRPC; the servicer in ``hotweightsd.server`` translates to and from it.
"""
