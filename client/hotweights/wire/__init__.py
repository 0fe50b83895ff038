"""The wire: generated gRPC code, the error table, and the fd side channel's framing."""
