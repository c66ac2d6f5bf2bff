"""One trace per request across every hop: real servers (a master and two leaves, as processes) exporting
their spans over OTLP to a receiver in the test, and the per-stage histograms with their exemplars."""

import re
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
import urllib3
from tensorflow_serving.apis import predict_pb2

import models
from helpers import HALF_PLUS_TWO, InProcessServer, ServerProcess, float_val, free_port, write_config
from otlp_receiver import CLIENT, ERROR, INTERNAL, SERVER, OtlpReceiver, children, trace_of, tree
from remote_predict.errors import ServingError
from remote_predict.serving import tracing_config
from remote_predict.split import cli as split_cli
from test_split import random_ids, recommender

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
MONITORING = 'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n'
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # the SDK's batch processor exports every 50 ms


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, receiver):
    """Two leaves traced through the standard OTEL_* variables, a master through --tracing_config_file.

    The master calls half_plus_two on leaf A over gRPC and REST and on leaf B over tcp, an unknown model
    on leaf B over gRPC, and a recommender split into two shards, one on each leaf, over tcp."""
    tmp = tmp_path_factory.mktemp("tracing")
    ports = {name: free_port() for name in ("a_grpc", "a_rest", "a_tcp", "b_grpc", "b_tcp")}
    shards = f"127.0.0.1:{ports['a_tcp']};127.0.0.1:{ports['b_tcp']}"
    assert split_cli.main([recommender(tmp / "rec.keras"), f"--output_dir={tmp / 'split'}", "--shards=2",
                           f"--shard_addresses={shards}", "--name=rec", "--tables=user_table,item_table"]) == 0
    leaves = []
    for k, (name, grpc_port, tcp_port, rest_port) in enumerate(
            [("leaf-a", ports["a_grpc"], ports["a_tcp"], ports["a_rest"]), ("leaf-b", ports["b_grpc"], ports["b_tcp"],
                                                                           None)]):
        config = write_config(tmp / f"{name}.config", {"half_plus_two": HALF_PLUS_TWO,
                                                       f"rec_shard_{k}": tmp / "split" / "shards" / f"rec_shard_{k}"})
        env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": name}
        leaves.append(ServerProcess(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
                                    f"--tcp_port={tcp_port}", grpc_port=grpc_port, rest_port=rest_port,
                                    rest=rest_port is not None, env=env, wait=False))
    a, b = leaves
    built = {
        "grpc_hop": models.caller(tmp / "grpc_hop" / "1", f"127.0.0.1:{ports['a_grpc']}", "half_plus_two"),
        "rest_hop": models.caller(tmp / "rest_hop" / "1", f"http://127.0.0.1:{ports['a_rest']}", "half_plus_two"),
        "tcp_hop": models.caller(tmp / "tcp_hop" / "1", f"tcp://127.0.0.1:{ports['b_tcp']}", "half_plus_two"),
        "broken": models.caller(tmp / "broken" / "1", f"127.0.0.1:{ports['b_grpc']}", "no_such_model"),
    }
    config = write_config(tmp / "master.config", {**{n: p.parent for n, p in built.items()},
                                                  "rec": tmp / "split" / "master"})
    (tmp / "tracing.txt").write_text(f'otlp_endpoint: "{receiver.endpoint}"\nsampling_ratio: 1.0\n'
                                     'service_name: "master"\n')
    (tmp / "monitoring.txt").write_text(MONITORING)
    master = ServerProcess(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
                           f"--tracing_config_file={tmp / 'tracing.txt'}",
                           f"--monitoring_config_file={tmp / 'monitoring.txt'}",
                           env=FAST_EXPORT, wait=False)
    try:
        for server in (a, b, master):
            server.wait_ready()
        yield master, a, b
    finally:
        for server in (master, a, b):
            server.stop()


def _master_span(receiver, model: str, trace_id: str | None = None, leaves: int = 1):
    """The master's server span for `model` (in `trace_id`, or the latest such trace), once the whole trace,
    `leaves` leaf server spans included, has arrived."""
    def complete(spans) -> bool:
        roots = [s for s in spans if s.service == "master" and s.kind == SERVER
                 and s.attributes.get("remote_predict.model.name") == model
                 and (trace_id is None or s.trace_id == trace_id)]
        return bool(roots) and sum(1 for s in trace_of(spans, roots[-1].trace_id)
                                   if s.service != "master" and s.kind == SERVER) >= leaves

    spans = receiver.wait_for(complete, f"the trace of a request to {model}")
    root = [s for s in spans if s.service == "master" and s.kind == SERVER
            and s.attributes.get("remote_predict.model.name") == model
            and (trace_id is None or s.trace_id == trace_id)][-1]
    return root, trace_of(spans, root.trace_id)


def _only(spans, **where):
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, f"expected one span with {where}, got {found}"
    return found[0]


@pytest.mark.parametrize(("model", "leaf", "protocol"), [("grpc_hop", "leaf-a", "grpc"), ("rest_hop", "leaf-a", "rest"),
                                                         ("tcp_hop", "leaf-b", "tcp")])
def test_one_trace_from_the_master_to_the_leaf(deployment, receiver, model, leaf, protocol):
    master, a, b = deployment
    assert float_val(master.predict(model, {"x": np.array([[2.0]], np.float32)}), "y").tolist() == [[3.0]]
    root, spans = _master_span(receiver, model)
    print(tree(spans))
    assert root.parent_id == "" and root.name == "Predict"
    assert root.attributes == {"remote_predict.api": "predict", "remote_predict.protocol": "grpc",
                               "remote_predict.model.name": model, "remote_predict.model.version": 1,
                               "remote_predict.model.signature": "serving_default",
                               "remote_predict.status_code": "OK"}
    run = _only(children(spans, root), name="run", kind=INTERNAL)
    call = _only(children(spans, run), name="RemotePredict", kind=CLIENT)
    target = {"grpc": a.address, "rest": a.rest, "tcp": f"tcp://127.0.0.1:{_flag(b, 'tcp_port')}"}[protocol]
    assert call.attributes["remote_predict.target"] == target
    assert call.attributes["remote_predict.model.name"] == "half_plus_two"
    assert call.attributes["remote_predict.status_code"] == "OK" and call.status != ERROR
    if protocol == "tcp":  # the replica that answered, and the frames' bodies
        assert call.attributes["remote_predict.endpoint"] == target.removeprefix("tcp://")
    if protocol != "rest":
        assert call.attributes["remote_predict.request.bytes"] > 0
        assert call.attributes["remote_predict.response.bytes"] > 0
    served = _only(spans, kind=SERVER, service=leaf, name="Predict")
    assert served.parent_id == call.span_id, "the leaf's server span is the master's client span's child"
    assert served.attributes["remote_predict.protocol"] == protocol
    assert served.attributes["remote_predict.model.name"] == "half_plus_two"
    assert served.attributes["remote_predict.model.version"] == 123
    assert _only(children(spans, served), name="run").kind == INTERNAL
    assert {s.trace_id for s in spans} == {root.trace_id}


def _flag(server: ServerProcess, name: str) -> str:
    return next(a.split("=", 1)[1] for a in server.proc.args if a.startswith(f"--{name}="))


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_an_incoming_traceparent_is_continued_and_its_sampling_decision_kept(deployment, receiver, protocol):
    master, _, _ = deployment
    x = np.array([[2.0]], np.float32)
    trace_id = TRACE_ID[:-1] + ("1" if protocol == "grpc" else "2")

    def send(traceparent: str) -> None:
        if protocol == "grpc":
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "tcp_hop"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            master.prediction().Predict(request, timeout=30, metadata=(("traceparent", traceparent),))
        else:
            response = urllib3.request("POST", f"http://127.0.0.1:{master.rest_port}/v1/models/tcp_hop:predict",
                                       body=b'{"instances": [[2.0]]}', headers={"traceparent": traceparent})
            assert response.status == 200, response.data

    unsampled = TRACE_ID[:-1] + ("3" if protocol == "grpc" else "4")
    send(f"00-{unsampled}-{PARENT_ID}-00")  # the caller decided not to sample this one
    send(f"00-{trace_id}-{PARENT_ID}-01")
    root, spans = _master_span(receiver, "tcp_hop", trace_id=trace_id)
    assert root.trace_id == trace_id and root.parent_id == PARENT_ID
    assert root.attributes["remote_predict.protocol"] == protocol
    leaf = _only(spans, kind=SERVER, service="leaf-b")
    client = _only(spans, kind=CLIENT)
    assert leaf.parent_id == client.span_id
    assert not trace_of(receiver.spans(), unsampled), "an unsampled parent's decision holds on every server"


def test_a_failing_leaf_is_recorded_on_every_span_with_its_code(deployment, receiver):
    master, _, _ = deployment
    with pytest.raises(grpc.RpcError) as caught:
        master.predict("broken", {"x": np.array([[2.0]], np.float32)})
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    root, spans = _master_span(receiver, "broken")
    print(tree(spans))
    assert root.status == ERROR and root.attributes["remote_predict.status_code"] == "NOT_FOUND"
    assert "no_such_model" in root.status_message
    client = _only(spans, kind=CLIENT)
    assert client.status == ERROR and client.attributes["remote_predict.status_code"] == "NOT_FOUND"
    assert client.attributes["remote_predict.model.name"] == "no_such_model"
    leaf = _only(spans, kind=SERVER, service="leaf-b")
    assert leaf.parent_id == client.span_id
    assert leaf.status == ERROR and leaf.attributes["remote_predict.status_code"] == "NOT_FOUND"
    assert leaf.status_message.startswith("NOT_FOUND: Servable not found for request")
    assert "remote_predict.model.version" not in leaf.attributes  # it never resolved to a version


def test_a_split_model_trace_holds_a_call_per_shard_and_each_shards_server_span(deployment, receiver):
    master, _, _ = deployment
    master.predict("rec", random_ids(np.random.default_rng(3), 4))
    root, spans = _master_span(receiver, "rec", leaves=2)
    print(tree(spans))
    lookup = _only(children(spans, _only(children(spans, root), name="run")), name="lookup")
    assert lookup.attributes["remote_predict.lookup.requests"] == 1
    calls = sorted(children(spans, lookup), key=lambda s: s.attributes["remote_predict.shard"])
    assert [c.kind for c in calls] == [CLIENT, CLIENT]
    for shard, (call, leaf) in enumerate(zip(calls, ("leaf-a", "leaf-b"), strict=True)):
        assert call.attributes["remote_predict.model.name"] == f"rec_shard_{shard}"
        assert call.attributes["remote_predict.model.signature"] == "lookup"
        served = _only(children(spans, call), kind=SERVER)
        assert served.service == leaf and served.attributes["remote_predict.protocol"] == "tcp"
        assert served.attributes["remote_predict.model.name"] == f"rec_shard_{shard}"


def test_stage_histograms_with_trace_ids_as_exemplars(deployment, receiver):
    master, _, _ = deployment
    for _ in range(3):
        master.predict("tcp_hop", {"x": np.array([[2.0]], np.float32)})
    response = urllib3.request("GET", f"http://127.0.0.1:{master.rest_port}/monitoring/prometheus/metrics",
                               headers=OPENMETRICS)
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = response.data.decode()
    stages = {}
    for stage in ("decode", "run", "remote", "encode"):
        labels = f'model="tcp_hop",stage="{stage}"'
        count = re.search(rf"remote_predict_request_stage_seconds_count\{{{labels}\}} (\S+)", text)
        total = re.search(rf"remote_predict_request_stage_seconds_sum\{{{labels}\}} (\S+)", text)
        assert count and total, f"no {stage} stage for tcp_hop"
        stages[stage] = (float(count.group(1)), float(total.group(1)))
    assert stages["run"][0] == stages["remote"][0] >= 3
    assert 0 < stages["remote"][1] <= stages["run"][1], "the remote calls are made within the run"
    assert 'model="tcp_hop",stage="queue"' not in text, "no batching on the master: no queue stage"
    exemplars = re.findall(r'remote_predict_request_stage_seconds_bucket\{le="[^"]+",model="tcp_hop",stage="remote"\} '
                           r'\S+ # \{trace_id="([0-9a-f]{32})"\}', text)
    assert exemplars, "sampled requests leave their trace ids on the histogram"
    traces = {s.trace_id for s in receiver.wait_for(
        lambda spans: set(exemplars) <= {s.trace_id for s in spans}, "the exemplars' traces")}
    assert set(exemplars) <= traces
    plain = urllib3.request("GET", f"http://127.0.0.1:{master.rest_port}/monitoring/prometheus/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain") and "trace_id" not in plain.data.decode()


def test_merged_batches_queue_and_run_spans_link_to_the_run_that_served_them(tmp_path, receiver):
    """Four requests merged into one run: each trace shows its wait and the run; the three whose rows rode in
    another request's run have a `run` span linked to that request's, which is the live one."""
    models.slow_scale(tmp_path / "slow" / "1", 2.0, delay_ms=200)
    batching = tmp_path / "batching.txt"
    batching.write_text("max_batch_size { value: 4 } batch_timeout_micros { value: 5000000 } "
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 10 }")
    (tmp_path / "tracing.txt").write_text(f'otlp_endpoint: "{receiver.endpoint}" service_name: "batcher"')
    with InProcessServer(f"--model_base_path={tmp_path / 'slow'}", "--model_name=slow", "--enable_batching",
                         f"--batching_parameters_file={batching}", f"--tracing_config_file={tmp_path / 'tracing.txt'}",
                         rest=False) as server:
        answers = {}

        def client(i: int) -> None:
            answers[i] = float_val(server.predict("slow", {"x": np.array([float(i)], np.float32)}), "y").tolist()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == {i: [2.0 * i] for i in range(4)}
        stages = server.server.metrics.registry
        assert stages.get_sample_value("remote_predict_request_stage_seconds_count",
                                       {"model": "slow", "stage": "queue"}) == 4
        server.server.tracing.provider.force_flush()
    spans = receiver.wait_for(lambda spans: sum(s.service == "batcher" and s.kind == SERVER for s in spans) >= 4,
                              "four traced requests")
    roots = [s for s in spans if s.service == "batcher" and s.kind == SERVER]
    runs = {}
    for root in roots:
        mine = children(spans, root)
        assert sorted(s.name for s in mine) == ["queue", "run"], tree(trace_of(spans, root.trace_id))
        runs[root.trace_id] = _only(mine, name="run")
    live = [r for r in runs.values() if not r.links]
    assert len(live) == 1, "one request's thread ran the merged batch"
    assert live[0].attributes["remote_predict.batch.requests"] == 4
    for run in runs.values():
        if run is not live[0]:
            assert run.links == [(live[0].trace_id, live[0].span_id)]
            assert run.attributes["remote_predict.batch.rows"] == 4


def test_stage_histograms_without_tracing(tmp_path):
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two") as server:
        assert server.server.tracing is None and server.server.runtime.tracing is None
        for _ in range(2):
            server.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)})
        assert server.post("/v1/models/half_plus_two:predict", {"instances": [[1.0]]})[0] == 200
        registry = server.server.metrics.registry
        for stage in ("decode", "run", "encode"):
            assert registry.get_sample_value("remote_predict_request_stage_seconds_count",
                                             {"model": "half_plus_two", "stage": stage}) == 3, stage
        for stage in ("queue", "remote"):
            assert registry.get_sample_value("remote_predict_request_stage_seconds_count",
                                             {"model": "half_plus_two", "stage": stage}) is None, stage


def test_no_spans_at_all_when_tracing_is_off(tmp_path):
    """OTEL_SDK_DISABLED=true wins over an endpoint in the environment: a master and a leaf, asked with and
    without a traceparent, send nothing (their shutdown would have flushed anything made)."""
    quiet = OtlpReceiver()
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": quiet.endpoint, "OTEL_SDK_DISABLED": "true"}
    try:
        leaf_port = free_port()
        leaf = ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                             f"--tcp_port={leaf_port}", rest=False, env=env, wait=False)
        models.caller(tmp_path / "hop" / "1", f"tcp://127.0.0.1:{leaf_port}", "half_plus_two")
        master = ServerProcess(f"--model_base_path={tmp_path / 'hop'}", "--model_name=hop", env=env, wait=False)
        try:
            leaf.wait_ready()
            master.wait_ready()
            x = np.array([[2.0]], np.float32)
            assert float_val(master.predict("hop", {"x": x}), "y").tolist() == [[3.0]]
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "hop"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            master.prediction().Predict(request, timeout=30,
                                        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
            assert master.post("/v1/models/hop:predict", {"instances": [[2.0]]}) == (200, {"predictions": [[3.0]]})
        finally:
            assert master.stop() == 0 and leaf.stop() == 0
        assert quiet.spans() == []
    finally:
        quiet.stop()


def _config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, tracing_config.TracingConfig())


def test_when_tracing_is_on_and_with_what():
    decide = tracing_config.decide
    assert decide(None, {}) is None
    assert decide(None, {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) is None
    assert decide(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == tracing_config.TracingSettings()
    assert decide(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}) is not None
    assert decide(None, {"OTEL_TRACES_EXPORTER": "otlp"}) is not None
    assert decide(None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) is None
    assert decide(_config(""), {"OTEL_SDK_DISABLED": "true"}) is None
    assert decide(_config(""), {}) == tracing_config.TracingSettings()  # every field from OTEL_* or the defaults
    assert decide(_config('otlp_endpoint: "https://c:4317" sampling_ratio: 0.01 service_name: "m"'), {}) == \
        tracing_config.TracingSettings(endpoint="https://c:4317", sampling_ratio=0.01, service_name="m")
    assert decide(_config("sampling_ratio: 0"), {}).sampling_ratio == 0.0  # set to zero, not left out
    for text, message in [('otlp_endpoint: "c:4317"', "must start with http:// (plaintext) or https://"),
                          ("sampling_ratio: 1.5", "sampling_ratio must be between 0 and 1"),
                          ('service_name: " "', "service_name must not be empty")]:
        with pytest.raises(ServingError, match=re.escape(message)) as caught:
            decide(_config(text), {})
        assert caught.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(ServingError, match="only the otlp exporter"):
        decide(None, {"OTEL_TRACES_EXPORTER": "console"})


def test_a_tracing_config_file_that_does_not_parse_is_refused(tmp_path):
    path = tmp_path / "tracing.txt"
    path.write_text("sampling_rate: 0.5\n")
    with pytest.raises(ServingError, match=r"Invalid protobuf file: .*tracing.txt.*sampling_rate"):
        tracing_config.settings(str(path), {})
    with pytest.raises(ServingError, match="Cannot read"):
        tracing_config.settings(str(tmp_path / "missing.txt"), {})


def test_merged_lookups_link_every_request_to_the_batch_that_fetched_its_rows(tmp_path, receiver):
    """Concurrent requests to a split master: their lookups merge into shared fan-outs. The shard calls of a
    merged fan-out are children of its leader's `lookup` span, which links to the others' `lookup` spans,
    and each of them links back."""
    from test_split import Split

    (tmp_path / "tracing.txt").write_text(f'otlp_endpoint: "{receiver.endpoint}" service_name: "split-master"')
    split = Split(recommender(tmp_path / "rec.keras", users=2000, items=500), tmp_path / "out", 2,
                  "--tables=user_table,item_table", master_flags=(f"--tracing_config_file={tmp_path / 'tracing.txt'}",))
    try:
        rng = np.random.default_rng(7)
        cases = [random_ids(rng, 4, users=2000, items=500) for _ in range(12)]

        def client(index: int) -> None:
            for round_ in range(5):
                split.master.predict(split.name, cases[(index + round_) % len(cases)])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        split.master.server.tracing.provider.force_flush()
    finally:
        split.stop()
    spans = [s for s in receiver.spans() if s.service == "split-master"]
    lookups = {s.span_id: s for s in spans if s.name == "lookup"}
    assert len(lookups) == 60, "one lookup span per request"
    merged = [s for s in lookups.values() if s.attributes.get("remote_predict.lookup.requests", 0) > 1]
    assert merged, "under this load some lookups are merged (as test_split checks by counting shard calls)"
    for leader in merged:
        calls = children(spans, leader)
        assert len(calls) == 2 and all(c.kind == CLIENT for c in calls), "the leader's span holds the shard calls"
        assert len(leader.links) == leader.attributes["remote_predict.lookup.requests"] - 1
        for _, follower_id in leader.links:
            follower = lookups[follower_id]
            assert follower.links == [(leader.trace_id, leader.span_id)] and not children(spans, follower)
            assert follower.trace_id != leader.trace_id  # another request's trace


def test_a_server_without_tracing_passes_the_callers_trace_context_on(tmp_path, receiver):
    """The master does not trace; the leaf it calls over gRPC does: the leaf's server span continues the
    client's traceparent, which the master passed on unchanged."""
    (tmp_path / "tracing.txt").write_text(f'otlp_endpoint: "{receiver.endpoint}" service_name: "traced-leaf"')
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                         f"--tracing_config_file={tmp_path / 'tracing.txt'}", rest=False) as leaf:
        models.caller(tmp_path / "hop" / "1", leaf.address, "half_plus_two")
        with InProcessServer(f"--model_base_path={tmp_path / 'hop'}", "--model_name=hop",
                             "--remote_predict_loopback_in_process=false") as master:
            assert master.server.tracing is None
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "hop"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[2.0]], np.float32)))
            trace_id = TRACE_ID[:-1] + "9"
            traceparent = f"00-{trace_id}-{PARENT_ID}-01"
            master.prediction().Predict(request, timeout=30, metadata=(("traceparent", traceparent),))
        leaf.server.tracing.provider.force_flush()
    served = _only(trace_of(receiver.spans(), trace_id), kind=SERVER)
    assert served.service == "traced-leaf" and served.parent_id == PARENT_ID
