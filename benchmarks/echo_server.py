"""The floor: a bare grpcio unary echo (no TensorFlow, no model), the best a Python hop can do here.

`python benchmarks/echo_server.py PORT [sync|aio]` answers any unary method with the request bytes.
"""

import asyncio
import sys
from concurrent import futures

import grpc

OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]


def _echo(request: bytes, context) -> bytes:
    return request


class _Echo(grpc.GenericRpcHandler):
    def __init__(self, handler):
        self._handler = handler

    def service(self, handler_call_details):
        return self._handler


def serve_sync(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=OPTIONS)
    server.add_generic_rpc_handlers([_Echo(grpc.unary_unary_rpc_method_handler(_echo))])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


async def serve_aio(port: int) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers([_Echo(grpc.unary_unary_rpc_method_handler(echo))])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "sync")
    if mode == "aio":
        asyncio.run(serve_aio(port))
    else:
        serve_sync(port)
