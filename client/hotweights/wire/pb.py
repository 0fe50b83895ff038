"""The generated protobuf and gRPC modules under short names."""

from hotweights.wire._proto.hotweights.v1 import hotweights_pb2 as pb
from hotweights.wire._proto.hotweights.v1 import hotweights_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
