"""remote-predict's framed TCP transport (`--tcp_port`, `tcp://` targets): answers, errors, health, TLS, replicas."""

import contextlib
import signal
import socket
import ssl
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import models
from helpers import HALF_PLUS_TWO, InProcessServer, ServerProcess, float_val, free_port, wait_until, write_config
from load import SteadyLoad, counts, describe
from remote_predict import frames
from tls import make_pki, ssl_config


def _leaf(*flags: str, **kwargs) -> InProcessServer:
    return InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                           f"--tcp_port={free_port()}", *flags, rest=False, **kwargs)


def _master(tmp_path, target: str, *flags: str, deadline_ms: int = 3000) -> InProcessServer:
    models.caller(tmp_path / "remote" / "1", target, "half_plus_two", deadline_ms=deadline_ms)
    models.caller(tmp_path / "missing" / "1", target, "no_such_model", deadline_ms=deadline_ms)
    config = write_config(tmp_path / "m.config", {"remote": tmp_path / "remote", "missing": tmp_path / "missing"})
    # In one process the op would reach the leaf in-process; these tests are about the wire.
    return InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
                           "--remote_predict_loopback_in_process=false", *flags, rest=False)


def test_remote_predict_over_tcp_answers_as_over_grpc(tmp_path):
    with _leaf() as leaf, _master(tmp_path, f"tcp://127.0.0.1:{leaf.server.tcp_port}") as master:
        x = np.array([[1.0], [2.0], [5.0]], np.float32)
        assert float_val(master.predict("remote", {"x": x}), "y").tolist() == [[2.5], [3.0], [4.5]]
        big = np.arange(300_000, dtype=np.float32).reshape(-1, 1)  # 1.2 MB each way
        assert np.array_equal(float_val(master.predict("remote", {"x": big}), "y"), 0.5 * big + 2)
        with pytest.raises(grpc.RpcError) as caught:
            master.predict("missing", {"x": x})
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no_such_model" in caught.value.details() and f"tcp://127.0.0.1:{leaf.server.tcp_port}" in \
            caught.value.details()
        assert float_val(master.predict("remote", {"x": x}), "y").tolist() == [[2.5], [3.0], [4.5]]


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed(sock: socket.socket) -> bool:
    """The server closed the connection (a reset when it left our bytes unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_the_tcp_port_refuses_garbage_and_keeps_serving(tmp_path):
    with _leaf() as leaf, _master(tmp_path, f"tcp://127.0.0.1:{leaf.server.tcp_port}") as master:
        port = leaf.server.tcp_port
        with _raw(port) as sock:  # an HTTP client on the wrong port: closed, nothing answered
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 20)
            assert _closed(sock)
        with _raw(port) as sock:  # a frame declaring more than the limit: closed at once
            sock.sendall(frames.HEADER.pack(frames.MAGIC, frames.PREDICT, 0, 0, 0, 0, frames.MAX_FRAME_BYTES + 1))
            assert _closed(sock)
        with _raw(port) as sock:  # a frame declaring 1 GiB and sending 10 bytes of it, then going away
            sock.sendall(frames.HEADER.pack(frames.MAGIC, frames.PREDICT, 0, 0, 0, 0, 1 << 30) + b"0123456789")
        with _raw(port) as sock:  # a well-framed body that is not a PredictRequest: an error answer, kept open
            frames.send(sock, frames.encode(frames.PREDICT, 1000, b"", b"\xff\xff\xff"))
            _, code, message, _ = frames.FrameReader().read(sock)
            assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and b"malformed" in message
            frames.send(sock, frames.encode(frames.HEALTH, 0, b"", b""))
            assert frames.FrameReader().read(sock)[1] == 0
        assert float_val(master.predict("remote", {"x": np.array([[2.0]], np.float32)}), "y").tolist() == [[3.0]]


def test_health_frames_say_serving_then_draining():
    leaf = _leaf()
    sock = _raw(leaf.server.tcp_port)
    try:
        frames.send(sock, frames.encode(frames.HEALTH, 0, b"", b""))
        assert frames.FrameReader().read(sock)[1] == 0
        leaf.server._tcp.draining = True  # what stop() does first
        frames.send(sock, frames.encode(frames.HEALTH, 0, b"", b""))
        assert frames.FrameReader().read(sock)[1] == grpc.StatusCode.UNAVAILABLE.value[0]
    finally:
        sock.close()
        leaf.stop()


def test_tcp_with_mutual_tls(tmp_path):
    ca, server, client = make_pki()
    leaf_ssl = ssl_config(tmp_path / "leaf_ssl.txt", server.key, server.cert, ca.cert, client_verify=True)
    client_tls = ssl_config(tmp_path / "client_tls.txt", client.key, client.cert, ca.cert)
    with _leaf(f"--ssl_config_file={leaf_ssl}") as leaf:
        target = f"tcp://localhost:{leaf.server.tcp_port}"
        with _master(tmp_path / "good", target, f"--remote_predict_client_tls_config_file={client_tls}") as master:
            assert float_val(master.predict("remote", {"x": np.array([[2.0]], np.float32)}), "y").tolist() == [[3.0]]
        anonymous = ssl_config(tmp_path / "anonymous.txt", ca=ca.cert)
        with _master(tmp_path / "bad", target, f"--remote_predict_client_tls_config_file={anonymous}") as master, \
                pytest.raises(grpc.RpcError) as caught:
            master.predict("remote", {"x": np.array([[2.0]], np.float32)})
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_call_never_outlives_its_request(tmp_path):
    """The client gives up after 300 ms: the master's call to the leaf carries what is left, so the leaf
    stops at about the same time instead of running its 3-second request to the end."""
    models.sleepy(tmp_path / "sleepy" / "1")
    leaf = InProcessServer(f"--model_base_path={tmp_path / 'sleepy'}", "--model_name=sleepy",
                           f"--tcp_port={free_port()}", "--monitoring_config_file=" + str(_monitoring(tmp_path)))
    models.fan_out(tmp_path / "master" / "1", [f"tcp://127.0.0.1:{leaf.server.tcp_port}"], deadline_ms=10000)
    config = write_config(tmp_path / "m.config", {"master": tmp_path / "master"})
    master = InProcessServer(f"--model_config_file={config}", "--remote_predict_loopback_in_process=false",
                             rest=False)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            master.predict("master", {"x": np.array([1.0], np.float32), "delay_ms": np.int64(3000)}, timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.0

        def leaf_gave_up() -> bool:
            _, text = leaf.get("/monitoring/prometheus/metrics")
            return 'remote_predict_requests_total{api="predict",code="DEADLINE_EXCEEDED",model="sleepy",' \
                   'protocol="tcp"} 1.0' in text
        wait_until(leaf_gave_up, 2.0, "the leaf's request to end DEADLINE_EXCEEDED")
        assert time.monotonic() - started < 2.5, "the leaf ran its request well past the client's deadline"
    finally:
        master.stop()
        leaf.stop()


def _monitoring(tmp_path):
    path = tmp_path / "monitoring.txt"
    path.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n')
    return path


def test_replicas_cover_for_a_killed_and_for_a_hung_replica(tmp_path):
    """Two replicas over tcp, steady load: one killed, restarted, then one stopped (SIGSTOP), continued."""
    ports = [free_port(), free_port()]
    leaves = [ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                            f"--tcp_port={port}", rest=False) for port in ports]
    target = "tcp://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    master = _master(tmp_path, target, deadline_ms=2000)
    load = SteadyLoad(master.address, {"remote": 4}, lambda model, x: 0.5 * x + 2.0, timeout=10, pause=0.005)
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        leaves[0].proc.kill()
        time.sleep(1.5)
        # Lower priority: on its own machine a restarting replica would take no CPU from the one left.
        leaves[0] = ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                                  f"--tcp_port={ports[0]}", rest=False, prefix=("nice", "-n", "10"))
        registry = master.server.metrics.registry
        wait_until(lambda: registry.get_sample_value("remote_predict_op_endpoint_up", {
            "target": target, "endpoint": f"127.0.0.1:{ports[0]}"}) == 1.0, 10, "the restarted replica to rejoin")
        time.sleep(0.5)
        stopped_at = time.monotonic()
        leaves[1].signal(signal.SIGSTOP)
        time.sleep(2.0)
        leaves[1].signal(signal.SIGCONT)
        continued_at = time.monotonic()
        time.sleep(1.5)
    finally:
        outcomes = load.stop()
        master.stop()
        for leaf in leaves:
            leaf.stop()
    summary = describe(outcomes)
    assert not counts(outcomes).get("WRONG"), summary
    assert set(counts(outcomes, since=killed_at)) == {"OK"}, summary  # nothing failed, through both faults
    during_stop = [o for o in outcomes if stopped_at <= o.started < continued_at]
    # Re-sent well within the 2 s deadline (detection takes at most a quarter of it, the re-sent call
    # and a busy machine's scheduling the rest).
    assert during_stop and max(o.seconds for o in during_stop) < 2.0 / 4 + 0.75, summary


def _answers_health_over_tls(port: int, ca: str) -> bool:
    context = ssl.create_default_context(cadata=ca)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            frames.send(sock, frames.encode(frames.HEALTH, 0, b"", b""))
            return frames.read(sock)[1] == 0
    except (OSError, EOFError, frames.FrameError):
        return False


def test_a_hung_replica_holds_neither_a_tls_handshake_nor_a_large_request(tmp_path):
    """A stopped process's kernel still accepts connections and buffers a few MB, then nothing: a TLS
    handshake with it, or an 8 MB request to it, must not hold the calling thread (and the call) until the
    deadline; the call goes to the other replica."""
    ca, server, _ = make_pki()
    leaf_ssl = ssl_config(tmp_path / "leaf_ssl.txt", server.key, server.cert)
    client_tls = ssl_config(tmp_path / "client_tls.txt", ca=ca.cert)
    ports = [free_port(), free_port()]
    leaves = [ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two", f"--tcp_port={port}",
                            f"--ssl_config_file={leaf_ssl}", rest=False, wait=False) for port in ports]
    masters = []
    try:
        for port in ports:
            wait_until(lambda port=port: _answers_health_over_tls(port, ca.cert), 120, f"the leaf on tcp port {port}",
                       interval=0.2)
        target = "tcp://" + ",".join(f"127.0.0.1:{port}" for port in ports)
        for name in ("warm", "fresh"):
            (tmp_path / name).mkdir()
            masters.append(_master(tmp_path / name, target, f"--remote_predict_client_tls_config_file={client_tls}",
                                   deadline_ms=10000))
        warm, fresh = masters
        small = np.array([[1.0], [2.0]], np.float32)
        for _ in range(4):  # connections to both replicas, kept for the next calls
            assert float_val(warm.predict("remote", {"x": small}), "y").tolist() == [[2.5], [3.0]]
        leaves[0].signal(signal.SIGSTOP)
        big = predict_pb2.PredictRequest()
        big.model_spec.name = "remote"
        x = np.arange(2_000_000, dtype=np.float32).reshape(-1, 1)  # 8 MB each way
        big.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
        with grpc.insecure_channel(warm.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            for _ in range(3):  # one of them is written to the stopped replica's open connection first
                assert np.array_equal(tf.make_ndarray(predict(big, timeout=60).outputs["y"]), 0.5 * x + 2)
        for _ in range(4):  # a master that has no connection yet: one of them starts a handshake with it
            assert float_val(fresh.predict("remote", {"x": small}), "y").tolist() == [[2.5], [3.0]]
    finally:
        for master in masters:
            master.stop()
        for leaf in leaves:
            leaf.stop()


def test_metrics_list_every_replica_from_the_first_call(tmp_path):
    """`remote_predict_op_endpoint_up` shows each replica a target resolves to, before anything failed: a
    dashboard or an alert on "fewer than two up" needs the ones that are fine, too."""
    with _leaf() as a, _leaf() as b:
        endpoints = [f"127.0.0.1:{leaf.server.tcp_port}" for leaf in (a, b)]
        target = "tcp://" + ",".join(endpoints)
        with _master(tmp_path, target) as master:
            assert float_val(master.predict("remote", {"x": np.array([[2.0]], np.float32)}), "y").tolist() == [[3.0]]
            registry = master.server.metrics.registry
            up = [registry.get_sample_value("remote_predict_op_endpoint_up", {"target": target, "endpoint": e})
                  for e in endpoints]
            assert up == [1.0, 1.0]
            a.stop()

            def ejected() -> bool:  # calls go on (and all succeed) until one is sent to the stopped replica
                master.predict("remote", {"x": np.array([[2.0]], np.float32)})
                return registry.get_sample_value("remote_predict_op_endpoint_up",
                                                 {"target": target, "endpoint": endpoints[0]}) == 0.0
            wait_until(ejected, 30, "the stopped replica to be ejected")
            assert registry.get_sample_value("remote_predict_op_ejections_total",
                                             {"target": target, "endpoint": endpoints[0]}) == 1.0


def test_a_frame_read_in_pieces_is_the_frame_read_at_once():
    """The non-blocking reader (calls and probes) and the blocking one (the server) agree, limits included."""
    body = bytes(range(256)) * 5000
    frame = b"".join(bytes(p) for p in frames.encode(frames.PREDICT, 7, b'{"a":"b"}', body))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        reader = frames.FrameReader()
        for i in range(0, len(frame), 4099):  # pieces that cut the header, the metadata and the body
            assert not reader.feed(ours)
            theirs.sendall(frame[i:i + 4099])
        assert reader.feed(ours)
        assert reader.frame() == (frames.PREDICT, 7, b'{"a":"b"}', bytearray(body))
        for bad, why in ((b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 10, "bad magic"),
                         (frames.HEADER.pack(frames.MAGIC, frames.PREDICT, 0, 0, 0, 0, 101), "larger than the limit"),
                         (frames.HEADER.pack(frames.MAGIC, 9, 0, 0, 0, 0, 0), "unknown frame kind")):
            theirs.sendall(bad)
            with pytest.raises(frames.FrameError, match=why):
                frames.FrameReader(max_body=100).feed(ours)
            with contextlib.suppress(BlockingIOError):
                ours.recv(1 << 16)  # what the reader left
        theirs.sendall(frame[:30])
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(frames.FrameError, match="in the middle of a frame"):
            frames.FrameReader().feed(ours)


def test_a_call_unanswered_after_the_hedge_delay_also_goes_to_the_other_replica(tmp_path):
    """Replica A takes a second per answer, B none (the same answers): with hedging, a call sent to A is
    also sent to B after 20 ms, B's answer is the one returned, and the hedge is counted; without
    hedging, the same calls are re-sent only once A counts as stopped answering. Hedged after the target's
    median latency instead (--remote_predict_hedge_percentile), the first calls (no median yet) are re-sent
    as without hedging, later ones hedged."""
    models.slow_scale(tmp_path / "slow" / "1", 1.0, 1000)
    models.slow_scale(tmp_path / "fast" / "1", 1.0, 0)
    slow, fast = (InProcessServer(f"--model_base_path={tmp_path / name}", "--model_name=m", f"--tcp_port={free_port()}",
                                  rest=False) for name in ("slow", "fast"))
    target = f"tcp://127.0.0.1:{slow.server.tcp_port},127.0.0.1:{fast.server.tcp_port}"
    masters = []
    try:
        for name, hedge, percentile in (("hedged", 20, 0), ("plain", 0, 0), ("by_median", 0, 50)):
            models.caller(tmp_path / name / "1", target, "m", deadline_ms=5000)
            config = write_config(tmp_path / f"{name}.config", {"remote": tmp_path / name})
            masters.append(InProcessServer(f"--model_config_file={config}", f"--remote_predict_hedge_after_ms={hedge}",
                                           f"--remote_predict_hedge_percentile={percentile}",
                                           "--remote_predict_loopback_in_process=false", rest=False))

        def extra(master: InProcessServer, kind: str) -> float:
            return master.server.metrics.registry.get_sample_value(
                "remote_predict_op_attempts_extra_total", {"target": target, "kind": kind}) or 0.0

        def answered_by_fast() -> float:
            return fast.server.metrics.registry.get_sample_value(
                "remote_predict_requests_total", {"model": "m", "api": "predict", "protocol": "tcp", "code": "OK"}) or 0
        for master, calls in zip(masters, (4, 4, 20), strict=True):
            before = answered_by_fast()
            for i in range(calls):  # calls take turns between the replicas: some are sent to the slow one first
                x = np.array([float(i)], np.float32)
                assert float_val(master.predict("remote", {"x": x}), "y").tolist() == [float(i)]
            assert answered_by_fast() - before == calls  # the fast replica's answer was every call's
        hedged, plain, by_median = masters
        assert extra(hedged, "hedge") >= 1 and extra(hedged, "resend") == 0
        assert extra(plain, "hedge") == 0 and extra(plain, "resend") >= 1
        assert extra(by_median, "hedge") >= 1
    finally:
        for server in [*masters, slow, fast]:
            server.stop()
