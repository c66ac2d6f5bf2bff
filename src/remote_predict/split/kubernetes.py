"""`remote-predict split --kubernetes`: the split's servers as Kubernetes objects, for `kubectl apply -k`.

Kubernetes is the cluster engine; these are plain manifests (no operator, nothing of ours that schedules
or discovers). Per server of the split: a ConfigMap with its model config (base paths in the store), a
Deployment, a Service, a HorizontalPodAutoscaler and a PodDisruptionBudget. The shards' Services are
headless, so the master's `dns:///` targets resolve to every ready pod and its round robin spreads calls
over all of them (a ClusterIP Service would pin each gRPC connection to one pod). Servers close
connections after GRPC_MAX_CONNECTION_AGE_MS, so that callers re-resolve and new pods get traffic too.

Everything is built as plain dicts by small functions and written with PyYAML; sizes are computed by
`sizing()`, a pure function whose arithmetic is written into the Deployment as a comment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from remote_predict import __version__
from remote_predict.split import deploy

MIB = 1 << 20
# Measured RSS of `remote-predict serve` holding only small models (benchmarks/RESULTS.md and README: the
# master 634 MB, the soak's leaves 602 MB): TensorFlow, gRPC and Python. Rounded up.
SERVER_BASE_BYTES = 768 * MIB
# A loaded version costs its checkpoint's bytes plus a little (the scale run: a 2,048 MiB shard slice
# peaked at 2,810 MB RSS over that base, about 1.05x); keep a margin.
MEMORY_PER_BYTE = 1.1
CACHE_SLACK_BYTES = 64 * MIB  # per pod: TF's and Python's scratch, logs
ASSUMED_LOAD_BYTES_PER_SECOND = 50 * MIB  # copy from the store + restore; only sizes the startup probe
DRAIN_TIMEOUT_SECONDS = 30
PRE_STOP_SECONDS = 5  # endpoints and DNS drop a terminating pod a moment after it is told to stop
POLL_SECONDS = 15  # each poll is one LIST request per pod and model to the store
GRPC_MAX_CONNECTION_AGE_MS = 60_000
CONFIG_DIR = "/etc/remote-predict"
CACHE_DIR = "/var/cache/remote-predict"
METRICS_PATH = "/monitoring/prometheus/metrics"
STORE_SECRET = "remote-predict-store"  # optional Secret with AWS_* variables (none needed with pod roles)
RUN_AS = 10001  # the Containerfile's user


@dataclass(frozen=True)
class Port:
    """A port every server listens on, and the `remote-predict serve` flag that sets it."""

    name: str
    number: int
    flag: str
    app_protocol: str


GRPC = Port("grpc", 8500, "--port", "grpc")
HTTP = Port("http", 8501, "--rest_api_port", "http")  # REST API and /monitoring/prometheus/metrics
TCP = Port("tcp", 8600, "--tcp_port", "remote-predict.dev/frames")  # Predict in remote-predict's frames
FRONT_PORTS = (GRPC, HTTP)  # a master's (or head's) pods and Service: what clients call
SHARD_PORTS = (GRPC, HTTP, TCP)  # a shard's pods: the master calls them on TCP
SHARD_SERVICE_PORTS = (TCP, GRPC)  # its headless Service: TCP, and the gRPC API (status, metadata)


@dataclass(frozen=True)
class Options:
    image: str
    namespace: str
    shard_replicas: int = 2
    master_replicas: int = 2
    max_replicas_factor: int = 4  # each HPA may grow a Deployment to this many times its replicas


@dataclass(frozen=True)
class Workload:
    """One server of the split as a Deployment."""

    split: str  # the split's (master model's) name
    server: deploy.Server  # its models (base paths in the store) and version policy
    front: bool  # the master (or head): clients call it; the others are called by it
    held_bytes: int  # bytes of one version of everything it serves
    versions: int  # versions its policy keeps loaded (the shards keep two: N and N+1 in a roll-out)

    @property
    def name(self) -> str:
        return resource_name(self.split, self.server.name)


def ports_of(workload: Workload) -> tuple[Port, ...]:
    return FRONT_PORTS if workload.front else SHARD_PORTS


def workloads(split: str, servers: Sequence[deploy.Server]) -> list[Workload]:
    """The split's servers as Deployments: the master (or head) faces clients, the others are called by it."""
    return [Workload(split=split, server=s, front=s.name in ("master", "head"), held_bytes=s.held_bytes or 0,
                     versions=s.versions_kept) for s in servers]


@dataclass(frozen=True)
class Sizing:
    memory: int
    cache: int  # --model_cache_max_bytes
    ephemeral: int  # emptyDir sizeLimit and the ephemeral-storage request and limit
    startup_seconds: int
    comment: str


def dns_label(text: str) -> str:
    """A DNS-1123 label (a Kubernetes name): lowercase letters, digits and '-', at most 63."""
    label = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in label:
        label = label.replace("--", "-")
    if not label:
        raise ValueError(f"{text!r} has no letters or digits to name a Kubernetes object after")
    return label[:63].rstrip("-")


def resource_name(split: str, server: str) -> str:
    return dns_label(f"{split}-{server}")


def service_host(split: str, server: str, namespace: str) -> str:
    """The cluster DNS name of a server's Service."""
    return f"{resource_name(split, server)}.{dns_label(namespace)}.svc.cluster.local"


def target(split: str, server: str, namespace: str) -> str:
    """Where the master calls this server: one function (deploy.shard_target) decides the form."""
    return deploy.shard_target(service_host(split, server, namespace), TCP.number)


def sizing(held_bytes: int, versions: int) -> Sizing:
    """Memory, cache and probe budgets for a server holding `versions` versions of `held_bytes` each.

    A new version loads beside the ones kept (no gap), so the peak is `versions + 1` copies, in memory and
    in the cache, during a roll-out.
    """
    peak = versions + 1
    # Whole MiB: a new version a few bytes larger (a roll-out) gives the same manifests.
    held_bytes = math.ceil(held_bytes / MIB) * MIB
    memory = SERVER_BASE_BYTES + math.ceil(peak * held_bytes * MEMORY_PER_BYTE)
    memory = math.ceil(memory / MIB) * MIB
    cache = math.ceil(peak * held_bytes * MEMORY_PER_BYTE) + 16 * MIB * peak
    ephemeral = math.ceil((cache + CACHE_SLACK_BYTES) / MIB) * MIB
    startup = 60 + math.ceil(versions * held_bytes / ASSUMED_LOAD_BYTES_PER_SECOND)
    comment = "\n".join([
        f"held: {held_bytes // MIB:,} MiB a version (rounded up); {versions} kept, {peak} at the peak of a roll-out "
        "(the new version loads beside the kept ones)",
        f"memory = {SERVER_BASE_BYTES // MIB} MiB (the server itself) + {peak} x {held_bytes // MIB:,} MiB x "
        f"{MEMORY_PER_BYTE} = {memory // MIB:,} MiB (request = limit: an OOM kill is worse than a wait)",
        f"model cache = {peak} x ({held_bytes // MIB:,} MiB x {MEMORY_PER_BYTE} + 16 MiB) = {cache / MIB:,.0f} MiB "
        f"(--model_cache_max_bytes); ephemeral storage = that + {CACHE_SLACK_BYTES // MIB} MiB = "
        f"{ephemeral // MIB:,} MiB",
        f"startup probe: 60 s + {versions} x {held_bytes // MIB:,} MiB at an assumed "
        f"{ASSUMED_LOAD_BYTES_PER_SECOND // MIB} MiB/s = {startup} s",
        "cpu: 1 requested, no limit (a CPU limit throttles latency); the HPA scales on it",
    ])
    return Sizing(memory, cache, ephemeral, startup, comment)


def _labels(workload: Workload) -> dict[str, str]:
    return {**_selector(workload), "app.kubernetes.io/part-of": dns_label(workload.split),
            "app.kubernetes.io/version": __version__, "app.kubernetes.io/managed-by": "kustomize"}


def _selector(workload: Workload) -> dict[str, str]:
    return {"app.kubernetes.io/name": "remote-predict", "app.kubernetes.io/instance": workload.name,
            "app.kubernetes.io/component": "master" if workload.front else "shard"}


def _meta(name: str, labels: dict[str, str]) -> dict:
    return {"name": name, "labels": dict(labels)}


def server_args(workload: Workload, size: Sizing) -> list[str]:
    """The `remote-predict serve` flags of a pod."""
    args = [f"{port.flag}={port.number}" for port in ports_of(workload)]
    args += [
        f"--model_config_file={CONFIG_DIR}/models/models.config",
        f"--monitoring_config_file={CONFIG_DIR}/monitoring/monitoring.config",
        f"--model_cache_dir={CACHE_DIR}",
        f"--model_cache_max_bytes={size.cache}",
        f"--file_system_poll_wait_seconds={POLL_SECONDS}",
        f"--drain_timeout_seconds={DRAIN_TIMEOUT_SECONDS}",
        f"--grpc_channel_arguments=grpc.max_connection_age_ms={GRPC_MAX_CONNECTION_AGE_MS},"
        f"grpc.max_connection_age_grace_ms={DRAIN_TIMEOUT_SECONDS * 1000}",
    ]
    return args


def _probe(period: int, failures: int, timeout: int = 5) -> dict:
    return {"grpc": {"port": GRPC.number}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": timeout}


def deployment(workload: Workload, options: Options, size: Sizing) -> dict:
    replicas = options.master_replicas if workload.front else options.shard_replicas
    grace = PRE_STOP_SECONDS + DRAIN_TIMEOUT_SECONDS + 15
    liveness_period = 10
    # The gRPC port refuses health checks while the server drains: liveness must outlast a drain.
    liveness_failures = math.ceil((PRE_STOP_SECONDS + DRAIN_TIMEOUT_SECONDS) / liveness_period) + 3
    container = {
        "name": "server",
        "image": options.image,
        "command": ["remote-predict", "serve"],
        "args": server_args(workload, size),
        "env": [{"name": "HOME", "value": "/tmp"}],
        "envFrom": [{"secretRef": {"name": STORE_SECRET, "optional": True}}],
        "ports": [{"name": p.name, "containerPort": p.number, "protocol": "TCP"} for p in ports_of(workload)],
        "resources": {
            "requests": {"cpu": "1", "memory": _quantity(size.memory), "ephemeral-storage": _quantity(size.ephemeral)},
            "limits": {"memory": _quantity(size.memory), "ephemeral-storage": _quantity(size.ephemeral)},
        },
        "startupProbe": _probe(10, math.ceil(size.startup_seconds / 10)),
        "readinessProbe": _probe(5, 2),
        "livenessProbe": _probe(liveness_period, liveness_failures),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "volumeMounts": [
            {"name": "models-config", "mountPath": f"{CONFIG_DIR}/models", "readOnly": True},
            {"name": "monitoring-config", "mountPath": f"{CONFIG_DIR}/monitoring", "readOnly": True},
            {"name": "model-cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(workload.name, _labels(workload)),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": _selector(workload)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": _labels(workload),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP.number),
                                    "prometheus.io/path": METRICS_PATH},
                },
                "spec": {
                    "serviceAccountName": dns_label(workload.split),
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                        "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        {"name": "models-config", "configMap": {"name": f"{workload.name}-models"}},
                        {"name": "monitoring-config", "configMap": {"name": f"{dns_label(workload.split)}-monitoring"}},
                        {"name": "model-cache", "emptyDir": {"sizeLimit": _quantity(size.ephemeral)}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                    ],
                },
            },
        },
    }


def service(workload: Workload) -> dict:
    ports = FRONT_PORTS if workload.front else SHARD_SERVICE_PORTS
    spec = {"selector": _selector(workload),
            "ports": [{"name": p.name, "port": p.number, "targetPort": p.name, "protocol": "TCP",
                       "appProtocol": p.app_protocol} for p in ports]}
    if workload.front:
        spec["type"] = "ClusterIP"
    else:
        spec["clusterIP"] = "None"  # headless: DNS answers every ready pod's address
        spec["publishNotReadyAddresses"] = False
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(workload.name, _labels(workload)), "spec": spec}


def autoscaler(workload: Workload, options: Options) -> dict:
    replicas = options.master_replicas if workload.front else options.shard_replicas
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(workload.name, _labels(workload)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": workload.name},
            "minReplicas": replicas,
            "maxReplicas": max(replicas + 1, replicas * options.max_replicas_factor),
            "metrics": [{"type": "Resource",
                         "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def disruption_budget(workload: Workload) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(workload.name, _labels(workload)),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(workload)}}}


def models_config(workload: Workload) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{workload.name}-models", _labels(workload)),
            "data": {"models.config": deploy.config_text(workload.server)}}


HPA_COMMENT = """\
CPU utilisation by default. To scale on requests instead, expose the servers' Prometheus counter
remote_predict_requests_total through the Prometheus adapter as a Pods metric (for example
remote_predict_requests_per_second = rate(remote_predict_requests_total[1m])) and use
  metrics: [{type: Pods, pods: {metric: {name: remote_predict_requests_per_second},
            target: {type: AverageValue, averageValue: "200"}}}]
Deployment.spec.replicas is the starting point; the HPA owns the count afterwards (minReplicas = it)."""


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing multi-line strings (model configs) as literal blocks."""


def _string(dumper: yaml.SafeDumper, text: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _string)


def _document(obj: dict, comment: str = "") -> str:
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return header + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _quantity(nbytes: int) -> str:
    return f"{math.ceil(nbytes / MIB)}Mi"


def workload_files(workload: Workload, options: Options) -> str:
    size = sizing(workload.held_bytes, workload.versions)
    role = "the master: clients call it" if workload.front else "a shard: the master calls it"
    models = ", ".join(f"{m} ({p})" for m, p in workload.server.models.items())
    docs = [
        _document(models_config(workload), f"{workload.name}: {role}; serves {models}"),
        _document(deployment(workload, options, size), size.comment),
        _document(service(workload), (
            "For clients: gRPC and REST, spread over the pods (a client's gRPC connection stays on one pod until "
            "the server closes it after grpc.max_connection_age_ms)") if workload.front else (
            f"Headless: {service_host(workload.split, workload.server.name, options.namespace)} resolves to every "
            "ready pod, and the master's dns:/// target round-robins over them")),
        _document(autoscaler(workload, options), HPA_COMMENT),
    ]
    docs.append(_document(disruption_budget(workload), "A voluntary disruption (a node drain) takes at most one pod "
                                                       "at a time"))
    return "---\n".join(docs)


def write(directory: str, workloads: Sequence[Workload], options: Options) -> list[str]:
    """Write `directory/kustomization.yaml` and the files it lists; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    split = workloads[0].split
    common = {"app.kubernetes.io/name": "remote-predict", "app.kubernetes.io/part-of": dns_label(split),
              "app.kubernetes.io/managed-by": "kustomize"}
    files: dict[str, str] = {
        "namespace.yaml": _document({"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": _meta(dns_label(options.namespace), common)}),
        "serviceaccount.yaml": _document(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(dns_label(split), common)},
            "The pods' identity: annotate it for a cloud role that reads the bucket (EKS: eks.amazonaws.com/role-arn), "
            f"or create the Secret {STORE_SECRET} with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and "
            "AWS_ENDPOINT_URL, AWS_REGION for a store other than AWS S3)"),
        "monitoring.yaml": _document(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{dns_label(split)}-monitoring", common),
             "data": {"monitoring.config": f'prometheus_config {{\n  enable: true\n  path: "{METRICS_PATH}"\n}}\n'}},
            "TF Serving's monitoring config: every pod serves Prometheus metrics on its REST port"),
    }
    for workload in workloads:
        files[f"{workload.name}.yaml"] = workload_files(workload, options)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": dns_label(options.namespace), "resources": list(files)}
    files["kustomization.yaml"] = _document(
        kustomization, f"kubectl apply -k {directory}\nWritten by remote-predict split --kubernetes; "
                       "a roll-out writes new versions to the store and changes nothing here.")
    written = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written
