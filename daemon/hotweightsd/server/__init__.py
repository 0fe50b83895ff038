"""The transport: the gRPC servicer, the fd side channel and socket ownership."""
