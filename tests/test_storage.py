"""Models in object storage: a real S3 server (SeaweedFS on loopback), real SavedModels, real servers.

Serving from s3://, a new version uploaded while serving (no gap), half-uploaded versions (not loaded
early), the store going away (what is loaded keeps serving, the error is reported), the model cache
(bounded, cleaned), credentials and endpoints from the standard environment.
"""

import logging
import os
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2

from helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, InProcessServer, ServerProcess, free_port, wait_until, write_config
from remote_predict.errors import Code
from remote_predict.serving import s3_store
from remote_predict.serving.manager import State
from seaweed import SeaweedStore
from test_versions import Load, states

X = {"x": np.array([[2.0]], np.float32)}
TWO = HALF_PLUS_TWO / "00000123"  # answers 3.0 for x = 2
THREE = HALF_PLUS_THREE / "00000123"  # answers 4.0


def copies(cache) -> list[str]:
    """The version copies in a model cache directory (one per loaded version)."""
    return sorted(p.name.rsplit("-", 1)[0] for p in cache.glob("run-*/*") if p.is_dir())


def test_serves_a_model_from_s3_and_cleans_its_copy(s3, tmp_path):
    store, bucket = s3
    store.upload(TWO, bucket, "hpt/1")
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "models.config", {"from_config": f"s3://{bucket}/hpt"})
    with InProcessServer(f"--model_config_file={config}", f"--model_cache_dir={cache}") as server:
        assert server.predict("from_config", X).outputs["y"].float_val == [3.0]
        status, body = server.get("/v1/models/from_config")
        assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
        assert copies(cache) == ["from_config-1"]
    assert copies(cache) == [], "copies are deleted when their versions unload"
    with InProcessServer(f"--model_base_path=s3://{bucket}/hpt", "--model_name=m", f"--model_cache_dir={cache}",
                         rest=False) as server:
        assert server.predict("m", X).outputs["y"].float_val == [3.0]


def test_a_version_uploaded_while_serving_is_picked_up_with_no_gap(s3, tmp_path):
    store, bucket = s3
    store.upload(TWO, bucket, "m/1")
    cache = tmp_path / "cache"
    with InProcessServer(f"--model_base_path=s3://{bucket}/m", "--model_name=m", f"--model_cache_dir={cache}",
                         "--file_system_poll_wait_seconds=1", rest=False) as server:
        load = Load(server, "m")
        time.sleep(0.3)
        store.upload(THREE, bucket, "m/2", skip=("saved_model.pb",))
        store.upload(THREE, bucket, "m/2", only=("saved_model.pb",))  # last, as `remote-predict split` does
        wait_until(lambda: states(server, "m") == {1: "END", 2: "AVAILABLE"}, 30, "version 2 to replace version 1")
        time.sleep(0.3)
        outcomes = load.stop()
        assert set(outcomes) == {"OK"}, f"every request must succeed during the swap: {outcomes}"
        assert load.versions == sorted(load.versions) and set(load.versions) == {1, 2}
        assert server.predict("m", X).outputs["y"].float_val == [4.0]
        wait_until(lambda: copies(cache) == ["m-2"], 10, "the retired version's copy to be deleted")


def test_a_half_uploaded_version_is_not_loaded_early(s3, tmp_path):
    """Polls driven by hand (--file_system_poll_wait_seconds=0, then manager.poll()), so nothing here is timed."""
    store, bucket = s3
    store.upload(TWO, bucket, "m/1")
    with InProcessServer(f"--model_base_path=s3://{bucket}/m", "--model_name=m",
                         f"--model_cache_dir={tmp_path / 'cache'}", "--file_system_poll_wait_seconds=0",
                         "--max_num_load_retries=0", rest=False) as server:
        manager = server.server.manager

        def poll_and_states() -> dict[int, State]:
            manager.poll()
            return {s.version: s.state for s in manager.status("m")}

        # Everything but saved_model.pb: however often it is listed, version 2 is not a version yet.
        store.upload(THREE, bucket, "m/2", skip=("saved_model.pb",))
        for _ in range(3):
            assert poll_and_states() == {1: State.AVAILABLE}
        # saved_model.pb first, the variables still coming: the listing changes between polls.
        store.upload(THREE, bucket, "m/3", only=("saved_model.pb",))
        assert poll_and_states() == {1: State.AVAILABLE}, "version 3 seen once: not settled"
        store.upload(THREE, bucket, "m/3", only=("variables/variables.index",))
        assert poll_and_states() == {1: State.AVAILABLE}, "version 3 changed since the last poll"
        store.upload(THREE, bucket, "m/3", skip=("saved_model.pb", "variables/variables.index"))
        assert poll_and_states() == {1: State.AVAILABLE}, "version 3 changed again"
        poll_and_states()  # unchanged since the last poll: complete
        wait_until(lambda: states(server, "m") == {1: "END", 3: "AVAILABLE"}, 30, "version 3 to load")
        assert server.predict("m", X).outputs["y"].float_val == [4.0]
        store.upload(THREE, bucket, "m/2", only=("saved_model.pb",))
        poll_and_states()
        poll_and_states()
        assert 2 not in {s.version for s in manager.status("m")}, "version 2 is older than 3: not wanted"


def test_the_store_going_away_keeps_serving_what_is_loaded_and_reports_it(tmp_path, monkeypatch, caplog):
    store = SeaweedStore(tmp_path / "store")  # its own store: this test stops it
    try:
        for key, value in store.env().items():
            monkeypatch.setenv(key, value)
        store.bucket("models")
        store.upload(TWO, "models", "m/1")
        monitoring = tmp_path / "monitoring.config"
        monitoring.write_text("prometheus_config { enable: true }")
        with InProcessServer("--model_base_path=s3://models/m", "--model_name=m", "--file_system_poll_wait_seconds=1",
                             f"--model_cache_dir={tmp_path / 'cache'}",
                             f"--monitoring_config_file={monitoring}") as server:
            manager = server.server.manager
            assert manager.store_error("m") is None
            with caplog.at_level(logging.WARNING, logger="remote_predict.serving.manager"):
                store.stop()  # returns once the process is gone (while it stops, it may answer InternalError)
                wait_until(lambda: "unreachable" in getattr(manager.store_error("m"), "message", ""), 60,
                           "the failed listing to be reported")
            error = manager.store_error("m")
            assert error.code == Code.UNAVAILABLE and "s3://models/m" in error.message
            assert any("Cannot list versions of m" in r.getMessage() for r in caplog.records)
            for _ in range(20):
                assert server.predict("m", X).outputs["y"].float_val == [3.0]
            assert states(server, "m") == {1: "AVAILABLE"}
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "m"
            status = server.models().GetModelStatus(request, timeout=10).model_version_status[0]
            assert status.status.error_code == Code.UNAVAILABLE and "s3://models/m" in status.status.error_message
            _, metrics = server.get("/monitoring/prometheus/metrics")
            assert 'remote_predict_model_store_up{model="m"} 0.0' in metrics
            assert 'remote_predict_model_store_errors_total{code="UNAVAILABLE",model="m"}' in metrics
    finally:
        store.stop()


def test_a_missing_bucket_or_unreachable_store_is_a_clear_error(s3, tmp_path):
    store, bucket = s3
    store.upload(TWO, bucket, "m/1")
    with InProcessServer(f"--model_base_path=s3://{bucket}/m", "--model_name=m",
                         f"--model_cache_dir={tmp_path / 'cache'}", "--file_system_poll_wait_seconds=0") as server:
        from test_versions import reload

        for base, code, words in ((f"s3://no-such-bucket-{bucket}/m", grpc.StatusCode.NOT_FOUND, "NoSuchBucket"),
                                  (f"s3://{bucket}/nothing-here", grpc.StatusCode.NOT_FOUND, "no objects under it"),
                                  ("gs://bucket/m", grpc.StatusCode.INVALID_ARGUMENT, "not supported")):
            with pytest.raises(grpc.RpcError) as caught:
                reload(server, f'model_config_list {{ config {{ name: "other" base_path: "{base}" }} }}')
            assert caught.value.code() == code and words in caught.value.details(), caught.value.details()
        assert server.predict("m", X).outputs["y"].float_val == [3.0], "a refused reload changes nothing"
    # At start: the server exits with the store's error (Kubernetes restarts it and shows the log).
    unreachable = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    wrong_key = {"AWS_SECRET_ACCESS_KEY": "not-the-key"}
    for env, words in ((unreachable, "the store is unreachable"), (wrong_key, "SignatureDoesNotMatch")):
        server = ServerProcess(f"--model_base_path=s3://{bucket}/m", "--model_name=m", wait=False, rest=False,
                               env={**store.env(), **env})
        assert server.proc.wait(120) == 1
        assert words in server.output() and f"s3://{bucket}/m" in server.output(), server.output()[-2000:]
        server.stop()


def test_tf_serving_s3_endpoint_variable_and_the_cache_bound(s3, tmp_path):
    store, bucket = s3
    store.upload(TWO, bucket, "m/1")
    env = {k: v for k, v in store.env().items() if k != "AWS_ENDPOINT_URL"}
    env.update(S3_ENDPOINT=f"{store.ip}:{store.s3_port}", S3_USE_HTTPS="0", AWS_ENDPOINT_URL="")
    cache = tmp_path / "cache"
    with ServerProcess(f"--model_base_path=s3://{bucket}/m", "--model_name=m", f"--model_cache_dir={cache}",
                       env=env) as server:
        assert server.predict("m", X).outputs["y"].float_val == [3.0]
    size = sum(p.stat().st_size for p in TWO.rglob("*") if p.is_file())
    with InProcessServer(f"--model_base_path=s3://{bucket}/m", "--model_name=m", f"--model_cache_dir={cache}",
                         f"--model_cache_max_bytes={size - 1}", "--max_num_load_retries=0", rest=False) as server:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "m"
        status = server.models().GetModelStatus(request, timeout=10).model_version_status[0]
        assert status.state == get_model_status_pb2.ModelVersionStatus.END
        assert status.status.error_code == Code.RESOURCE_EXHAUSTED
        assert "--model_cache_max_bytes" in status.status.error_message
        assert copies(cache) == []


def test_endpoint_from_the_environment():
    assert s3_store.endpoint_from_environment({}) == (None, True)
    assert s3_store.endpoint_from_environment({"S3_ENDPOINT": "minio:9000"}) == ("https://minio:9000", True)
    assert s3_store.endpoint_from_environment(
        {"S3_ENDPOINT": "minio:9000", "S3_USE_HTTPS": "0", "S3_VERIFY_SSL": "0"}) == ("http://minio:9000", False)
    # boto3 reads AWS_ENDPOINT_URL itself; it wins over TF Serving's variable.
    assert s3_store.endpoint_from_environment({"AWS_ENDPOINT_URL": "http://a:1", "S3_ENDPOINT": "b:2"}) == (None, True)
    assert s3_store.parse("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert s3_store.parse("s3://bucket").key("1/saved_model.pb") == "1/saved_model.pb"
    with pytest.raises(Exception, match="names no bucket"):
        s3_store.parse("s3:///prefix")


def test_a_killed_servers_copies_are_removed_by_the_next_one(tmp_path):
    from remote_predict.serving.model_cache import ModelCache

    cache = tmp_path / "cache"
    first = ModelCache(str(cache))
    copy = first.reserve(10, "m-1")
    second = ModelCache(str(cache))  # the first one's process is alive (its lock is held): nothing is removed
    assert os.path.isdir(copy)
    first._lock_file.close()  # what the kernel does when the first process is killed
    third = ModelCache(str(cache))
    assert not os.path.exists(copy) and os.path.isdir(second.run_dir) and os.path.isdir(third.run_dir)
    second.close()
    third.close()


def test_a_split_read_from_and_written_to_the_store_is_served_from_it(s3, tmp_path):
    """The SavedModel export is read from s3://, the split written to s3://, every server loads from there."""
    from remote_predict.split import cli as split_cli
    from test_split import exported, random_ids, recommender

    store, bucket = s3
    export = exported(recommender(tmp_path / "rec.keras"), tmp_path / "export")
    store.upload(tmp_path / "export", bucket, "exports/rec")
    ports = [free_port(), free_port()]
    deploy = tmp_path / "deploy"
    assert split_cli.main([f"s3://{bucket}/exports/rec", f"--output_dir=s3://{bucket}/split", f"--deploy_dir={deploy}",
                           "--shards=2", "--threshold_mib=0", "--name=rec", "--export_unsplit",
                           f"--shard_addresses=127.0.0.1:{ports[0]};127.0.0.1:{ports[1]}"]) == 0
    keys = store.keys(bucket, "split/")
    assert "split/master/1/saved_model.pb" in keys and "split/shards/rec_shard_1/1/saved_model.pb" in keys
    assert export and not (deploy / "master").exists(), "nothing but the deployment files is kept locally"
    shard_config = (deploy / "config" / "shard_0.config").read_text()
    assert f'base_path: "s3://{bucket}/split/shards/rec_shard_0"' in shard_config
    cache = f"--model_cache_dir={tmp_path / 'cache'}"
    shards = [InProcessServer(f"--model_config_file={deploy / 'config' / f'shard_{k}.config'}", cache,
                              f"--tcp_port={port}", rest=False) for k, port in enumerate(ports)]
    both = write_config(tmp_path / "both.config", {"rec": f"s3://{bucket}/split/master",
                                                   "unsplit": f"s3://{bucket}/split/unsplit"})
    master = InProcessServer(f"--model_config_file={both}", cache, "--remote_predict_loopback_in_process=false",
                             rest=False)
    try:
        rng = np.random.default_rng(3)
        for batch in (1, 8, 33):
            inputs = random_ids(rng, batch)
            got = tf.make_ndarray(master.predict("rec", inputs).outputs["output_0"])
            expected = tf.make_ndarray(master.predict("unsplit", inputs).outputs["output_0"])
            assert got.shape == (batch, 1) and got.tobytes() == expected.tobytes()
        # A version that is already in the store is refused before anything is written.
        with pytest.raises(SystemExit, match="version 1 is already in s3:"):
            split_cli.main([f"s3://{bucket}/exports/rec", f"--output_dir=s3://{bucket}/split", f"--deploy_dir={deploy}",
                            "--shards=2", "--threshold_mib=0", "--name=rec"])
    finally:
        for server in [master, *shards]:
            server.stop()
