"""The model manager: keeps the wanted versions of every configured model loaded, and hands them out.

As in TF Serving's core, three concerns are kept apart: what versions exist (`source`), which are
wanted (`version_policy`, a pure function), and doing it (this module). Loading is availability
preserving: an old version is unloaded only once a wanted version is AVAILABLE, so there is no gap.
Requests hold a version through a `ServableHandle`; unloading waits until no request holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from tensorflow_serving.config import model_server_config_pb2

from remote_predict.errors import Code, ServingError, invalid_argument, not_found
from remote_predict.serving import servable as servable_lib
from remote_predict.serving import source, version_policy, warmup

log = logging.getLogger(__name__)

ModelConfig = model_server_config_pb2.ModelConfig


class State(Enum):
    """A version's state, named as in GetModelStatus (ModelVersionStatus.State)."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


@dataclass(frozen=True)
class ManagerOptions:
    load_options: servable_lib.LoadOptions = field(default_factory=servable_lib.LoadOptions)
    poll_seconds: float = 1.0  # > 0: poll periodically; 0: list versions once at start (and on reload)
    num_load_threads: int = 1
    max_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    allow_labels_for_unavailable_models: bool = False
    num_unload_threads: int = 0  # 0: four


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: State
    error: ServingError | None


class VersionEntry:
    """One version of one model, and the requests currently holding it."""

    def __init__(self, version: int, path: str):
        self.version = version
        self.path = path
        self.state = State.START
        self.error: ServingError | None = None
        self.servable: servable_lib.Servable | None = None
        self.attempts = 0
        self.retry_at = 0.0
        self.fingerprint = 0
        self._cond = threading.Condition(threading.Lock())
        self._inflight = 0

    def try_acquire(self) -> bool:
        with self._cond:
            if self.state is not State.AVAILABLE:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    def begin_unload(self) -> None:
        with self._cond:
            self.state = State.UNLOADING

    def wait_idle(self, label: str) -> None:
        with self._cond:
            waited = 0.0
            while self._inflight:
                self._cond.wait(timeout=10.0)
                waited += 10.0
                if self._inflight:
                    log.warning("Unloading %s waits for %d request(s) still in flight (%.0fs)",
                                label, self._inflight, waited)


class ServableHandle:
    """A version held for one request; release it by leaving the `with` block."""

    def __init__(self, name: str, entry: VersionEntry):
        self.name = name
        self.version = entry.version
        self.servable: servable_lib.Servable = entry.servable  # type: ignore[assignment]
        self._entry: VersionEntry | None = entry

    def release(self) -> None:
        if self._entry is not None:
            self._entry.release()
            self._entry = None

    def __enter__(self) -> ServableHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Model:
    def __init__(self, config: ModelConfig):
        self.config = config
        self.versions: dict[int, VersionEntry] = {}
        self.available: tuple[int, ...] = ()  # AVAILABLE versions, newest first (replaced, never mutated)
        self.labels: dict[str, int] = {}
        self.on_disk: dict[int, str] = {}
        self.removed = False
        self.warned_missing = False

    @property
    def name(self) -> str:
        return self.config.name

    def refresh_available(self) -> None:
        self.available = tuple(sorted(
            (v for v, e in self.versions.items() if e.state is State.AVAILABLE), reverse=True))


EventListener = Callable[[str, int, State, "ServingError | None"], None]


class ModelManager:
    def __init__(self, options: ManagerOptions, listeners: Sequence[EventListener] = ()):
        self.options = options
        self._listeners = list(listeners)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._models: dict[str, Model] = {}
        self._loader = ThreadPoolExecutor(max(1, options.num_load_threads), thread_name_prefix="model-load")
        self._unloader = ThreadPoolExecutor(options.num_unload_threads or 4, thread_name_prefix="model-unload")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_poll = 0.0

    # ------------------------------------------------------------------------------ configuration

    def start(self, configs: Sequence[ModelConfig]) -> None:
        """Load the configured models, wait until every wanted version settled, then keep polling."""
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()
        self.reload(configs)

    def reload(self, configs: Sequence[ModelConfig]) -> None:
        """Apply a new model list: add, update and remove models; then apply version labels."""
        for config in configs:
            try:
                source.list_versions(config.base_path)
            except FileNotFoundError:
                raise not_found(f"Could not find base path {config.base_path} for servable {config.name}") from None
            except OSError as e:
                raise invalid_argument(f"Cannot read base path {config.base_path} of {config.name}: {e}") from None
        with self._lock:
            wanted = {c.name: c for c in configs}
            for name, model in self._models.items():
                if name not in wanted and not model.removed:
                    log.info("Model %s is no longer configured; unloading it", name)
                    model.removed = True
                    self._reconcile(model, list_disk=False)
            for config in configs:
                model = self._models.get(config.name)
                if model is None or model.removed:
                    self._models[config.name] = Model(config)
                else:
                    model.config = config
            for config in configs:
                self._reconcile(self._models[config.name], list_disk=True)
            self._wait_settled([c.name for c in configs])
            self._apply_labels(configs)

    def _apply_labels(self, configs: Iterable[ModelConfig]) -> None:
        updates = {}
        for config in configs:
            model = self._models[config.name]
            labels = dict(config.version_labels)
            for label, version in labels.items():
                if not label:
                    raise invalid_argument(f"Model {config.name} has an empty version label")
                if not self.options.allow_labels_for_unavailable_models and version not in model.available:
                    raise ServingError(
                        Code.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {config.name}, which is not "
                        "currently available for inference",
                    )
            updates[config.name] = labels
        for name, labels in updates.items():
            self._models[name].labels = labels

    def _wait_settled(self, names: Iterable[str]) -> None:
        def pending() -> bool:
            for name in names:
                model = self._models.get(name)
                if model and any(e.state in (State.START, State.LOADING) for e in model.versions.values()):
                    return True
            return False

        while pending() and not self._stopping.is_set():
            self._changed.wait(timeout=1.0)

    # ---------------------------------------------------------------------------- reconciliation

    def _run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            timeout = 3600.0
            if self.options.poll_seconds > 0:
                timeout = max(0.0, self._next_poll - now)
            with self._lock:
                retries = [e.retry_at for m in self._models.values() for e in m.versions.values() if e.retry_at]
            if retries:
                timeout = min(timeout, max(0.0, min(retries) - now))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping.is_set():
                return
            poll = self.options.poll_seconds > 0 and time.monotonic() >= self._next_poll
            if poll:
                self._next_poll = time.monotonic() + self.options.poll_seconds
            with self._lock:
                for model in list(self._models.values()):
                    try:
                        self._reconcile(model, list_disk=poll)
                    except Exception:  # never let one model's trouble stop the manager
                        log.exception("Error while managing model %s", model.name)

    def _set_state(self, model: Model, entry: VersionEntry, state: State, error: ServingError | None = None) -> None:
        entry.state = state
        entry.error = error
        model.refresh_available()
        self._changed.notify_all()
        for listener in self._listeners:
            try:
                listener(model.name, entry.version, state, error)
            except Exception:
                log.exception("State listener failed")

    def _reconcile(self, model: Model, list_disk: bool) -> None:
        """Schedule loads and unloads so that the loaded versions become the wanted ones. Holds the lock."""
        if model.removed or self._stopping.is_set():
            for entry in model.versions.values():
                if entry.state is State.AVAILABLE:
                    self._schedule_unload(model, entry)
            return
        if list_disk:
            try:
                model.on_disk = source.list_versions(model.config.base_path)
                model.warned_missing = False
            except OSError as e:
                if not model.warned_missing:
                    log.warning("Cannot list versions of %s under %s (%s); still serving what is loaded",
                                model.name, model.config.base_path, e)
                    model.warned_missing = True
                return
        on_disk = model.on_disk
        for version, entry in list(model.versions.items()):
            replaced = version in on_disk and source.fingerprint(on_disk[version]) != entry.fingerprint
            if entry.state is State.END and entry.error is not None and (version not in on_disk or replaced):
                del model.versions[version]  # a failed version that changed on disk deserves a new try
        if not on_disk:
            return  # nothing on disk (yet, or any more): keep serving what is loaded
        failed = {v for v, e in model.versions.items() if e.state is State.END and e.error is not None}
        aspired = version_policy.aspired_versions(model.config.model_version_policy, on_disk, failed)
        now = time.monotonic()
        for version in aspired:
            entry = model.versions.get(version)
            if entry is None or (entry.state is State.END and entry.error is None):
                entry = VersionEntry(version, on_disk[version])
                model.versions[version] = entry
                self._schedule_load(model, entry)
            elif entry.state is State.LOADING and entry.retry_at and now >= entry.retry_at:
                entry.retry_at = 0.0
                self._loader.submit(self._load, model, entry)
        ready = any(model.versions[v].state is State.AVAILABLE for v in aspired if v in model.versions)
        pending = any(model.versions[v].state in (State.START, State.LOADING) for v in aspired if v in model.versions)
        if ready or not pending:
            for version, entry in list(model.versions.items()):
                if version not in aspired and entry.state is State.AVAILABLE:
                    self._schedule_unload(model, entry)

    def _schedule_load(self, model: Model, entry: VersionEntry) -> None:
        log.info("Loading %s version %d from %s", model.name, entry.version, entry.path)
        self._set_state(model, entry, State.LOADING)
        self._loader.submit(self._load, model, entry)

    def _load(self, model: Model, entry: VersionEntry) -> None:
        started = time.monotonic()
        try:
            servable = servable_lib.load(model.name, entry.version, entry.path, self.options.load_options)
            if self.options.load_options.warmup:
                try:
                    warmup.run(servable)
                except ServingError:
                    servable.close()
                    raise
        except ServingError as e:
            with self._lock:
                entry.attempts += 1
                if entry.attempts <= self.options.max_load_retries and not self._stopping.is_set():
                    entry.retry_at = time.monotonic() + self.options.load_retry_interval_seconds
                    entry.error = e
                    log.warning("Loading %s version %d failed (attempt %d, retrying in %.1fs): %s", model.name,
                                entry.version, entry.attempts, self.options.load_retry_interval_seconds, e.message)
                    self._wake.set()
                    return
                entry.fingerprint = source.fingerprint(entry.path)
                log.error("Loading %s version %d failed: %s", model.name, entry.version, e.message)
                self._set_state(model, entry, State.END, e)
                self._reconcile(model, list_disk=False)  # fall back to the next wanted version
            return
        with self._lock:
            if model.removed or self._stopping.is_set() or model is not self._models.get(model.name):
                servable.close()
                self._set_state(model, entry, State.END)
                return
            entry.servable = servable
            entry.retry_at = 0.0
            log.info("Model %s version %d is AVAILABLE (loaded in %.2fs)", model.name, entry.version,
                     time.monotonic() - started)
            self._set_state(model, entry, State.AVAILABLE)
            self._reconcile(model, list_disk=False)  # unload what this version replaces

    def _schedule_unload(self, model: Model, entry: VersionEntry) -> None:
        log.info("Unloading %s version %d", model.name, entry.version)
        entry.begin_unload()
        self._set_state(model, entry, State.UNLOADING)
        self._unloader.submit(self._unload, model, entry)

    def _unload(self, model: Model, entry: VersionEntry) -> None:
        entry.wait_idle(f"{model.name} version {entry.version}")
        servable, entry.servable = entry.servable, None
        if servable is not None:
            servable.close()
        with self._lock:
            self._set_state(model, entry, State.END)

    # ------------------------------------------------------------------------------------ requests

    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> ServableHandle:
        """Hold the requested version (default: the newest AVAILABLE) until the handle is released."""
        model = self._models.get(name)
        if label is not None:
            if model is None or model.removed or label not in model.labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = model.labels[label]
        if model is not None and not model.removed:
            if version is not None:
                entry = model.versions.get(version)
                if entry is not None and entry.try_acquire():
                    return ServableHandle(name, entry)
            else:
                for candidate in model.available:
                    entry = model.versions.get(candidate)
                    if entry is not None and entry.try_acquire():
                        return ServableHandle(name, entry)
        request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        raise not_found(f"Servable not found for request: {request}")

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise not_found(f"Could not find any versions of model {name}")
            if label is not None:
                if label not in model.labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = model.labels[label]
            entries = sorted(model.versions.values(), key=lambda e: e.version)
            if version is not None:
                entries = [e for e in entries if e.version == version]
                if not entries:
                    raise not_found(f"Could not find version {version} of model {name}")
            if not entries:
                raise not_found(f"Could not find any versions of model {name}")
            return [VersionStatus(e.version, e.state, e.error) for e in entries]

    def model_names(self) -> list[str]:
        return sorted(n for n, m in self._models.items() if not m.removed)

    def loaded_servables(self) -> list[servable_lib.Servable]:
        with self._lock:
            return [e.servable for m in self._models.values() for e in m.versions.values()
                    if e.state is State.AVAILABLE and e.servable is not None]

    def stop(self) -> None:
        """Unload everything (each version after its in-flight requests finish)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            for model in self._models.values():
                self._reconcile(model, list_disk=False)
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._unloader.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
