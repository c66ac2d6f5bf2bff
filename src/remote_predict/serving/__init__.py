"""The model server: model manager, data plane, gRPC and REST front-ends."""
