"""`remote-predict`: one command, several tools."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

USAGE = """usage: remote-predict COMMAND [ARGS]

commands:
  serve     serve SavedModels over TF Serving's gRPC and REST APIs (tensorflow_model_server's flags)
  export    write the seed's example models (half_plus_two, half_plus_two_with_rpop)
  demo      run the seed's walk-through end to end on this machine
  bench     load a TF Serving-compatible server; report requests/s and latency per concurrency
  split     split a Keras model: shard its embedding tables over servers, or cut it into base and head
  health    check servers' health (gRPC health service, or a --tcp_port's HEALTH frame), or wait for them

Run `remote-predict COMMAND --help` for a command's options.
"""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s] %(message)s",
                        stream=sys.stderr)
    # TensorFlow's Python logger has its own handler; route it through ours, without its INFO chatter.
    tf_log = logging.getLogger("tensorflow")
    tf_log.handlers.clear()
    tf_log.setLevel(logging.WARNING)
    tf_log.propagate = True


def process_started() -> float:
    """When this process started, on the `time.monotonic()` clock: a command's time includes starting
    Python and importing TensorFlow, most of a small split's. Linux says so in /proc; elsewhere, now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0
    return time.monotonic() - max(0.0, age)


def serve(argv: list[str]) -> int:
    from remote_predict import __version__
    from remote_predict.errors import ServingError
    from remote_predict.serving import flags
    from remote_predict.serving.server import ModelServer

    try:
        options, show_version = flags.parse(argv)
    except flags.FlagError as e:
        print(f"remote-predict serve: error: {e}", file=sys.stderr)
        return 2
    if show_version:
        print(f"remote-predict {__version__} (TensorFlow Serving API compatible)")
        return 0
    _setup_logging()
    log = logging.getLogger("remote_predict")
    server = ModelServer(options)
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
        except (ServingError, OSError) as e:
            print(f"remote-predict serve: error: {getattr(e, 'message', None) or e}", file=sys.stderr)
            return 1
        ports = f"gRPC port {server.grpc_port}" + (f", REST port {server.rest_port}" if server.rest_port else "")
        print(f"remote-predict serving on {options.host} ({ports})", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("Shutting down: draining requests for up to %.0fs", options.drain_timeout_seconds)
        server.stop()
        log.info("Stopped")
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "export":
        from remote_predict.tools import export

        return export.main(rest)
    if command == "bench":
        from remote_predict.tools import bench

        return bench.main(rest)
    if command == "split":
        from remote_predict.split import cli as split_cli

        return split_cli.main(rest, started=process_started())
    if command == "health":
        from remote_predict.tools import health

        return health.main(rest)
    if command == "demo":
        from remote_predict.tools import demo

        return demo.main(rest)
    print(f"remote-predict: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
