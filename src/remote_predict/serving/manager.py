"""The model manager: keeps the wanted versions of every configured model loaded, and hands them out.

As in TF Serving's core, three concerns are kept apart: what versions exist (`storage`: local
directories or an object store), which are wanted and what to do next (`version_policy` and
`load_plan`, pure functions), and doing it (this module). Loading is availability preserving: an old
version is unloaded only once a wanted version is AVAILABLE, so there is no gap. Requests hold a version
through a `ServableHandle`; unloading waits until no request holds it.

Storage is listed outside the manager's lock (an object store may take seconds to answer, or not answer),
and the loader is injectable (default `servable.load`) so that tests drive the riskiest logic with fake
servables, fast.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tensorflow_serving.config import model_server_config_pb2

from remote_predict.errors import Code, ServingError, invalid_argument, not_found
from remote_predict.serving import load_plan, warmup
from remote_predict.serving import servable as servable_lib
from remote_predict.serving.load_plan import Held, State
from remote_predict.serving.storage import LocalCopy, Storage, StoredVersion

log = logging.getLogger(__name__)

ModelConfig = model_server_config_pb2.ModelConfig
Loader = Callable[[str, int, str, servable_lib.LoadOptions], servable_lib.Servable]
__all__ = ["Loader", "ManagerOptions", "ModelManager", "ServableHandle", "State", "VersionStatus"]


@dataclass(frozen=True)
class ManagerOptions:
    load_options: servable_lib.LoadOptions = field(default_factory=servable_lib.LoadOptions)
    poll_seconds: float = 1.0  # > 0: poll periodically; 0: list versions once at start (and on reload)
    num_load_threads: int = 1
    max_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    allow_labels_for_unavailable_models: bool = False
    num_unload_threads: int = 0  # 0: four
    cache_dir: str = ""  # where versions from object stores are copied ("": under the system's temp dir)
    cache_max_bytes: int = 0  # 0: the disk's free space is the limit
    # Object stores: at start (and on reload) the base path is listed twice this far apart, so that a
    # version still being uploaded is not taken for complete.
    settle_seconds: float = 1.0


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: State
    error: ServingError | None


class VersionEntry:
    """One version of one model, and the requests currently holding it."""

    def __init__(self, stored: StoredVersion):
        self.version = stored.version
        self.stored = stored  # what was listed when the load (or its last retry) was planned
        self.state = State.START
        self.error: ServingError | None = None
        self.servable: servable_lib.Servable | None = None
        self.copy: LocalCopy | None = None  # the local directory loaded from (a cache copy for stored objects)
        self.attempts = 0
        self.retry_at = 0.0
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

    @property
    def path(self) -> str:
        return self.stored.path

    def held(self, now: float) -> Held:
        """This version as the load plan sees it."""
        waiting = self.state is State.LOADING and self.retry_at > 0
        return Held(self.state, failed=self.state is State.END and self.error is not None,
                    fingerprint=self.stored.fingerprint, retry_due=waiting and now >= self.retry_at,
                    retrying=waiting)

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
        self.stored: dict[int, StoredVersion] = {}  # the last listing of its base path
        self.ready: frozenset[int] = frozenset()  # versions of that listing complete enough to load
        self.store_error: ServingError | None = None  # why the last listing failed (None: it worked)
        self.removed = False

    @property
    def name(self) -> str:
        return self.config.name

    def refresh_available(self) -> None:
        self.available = tuple(sorted(
            (v for v, e in self.versions.items() if e.state is State.AVAILABLE), reverse=True))

    def apply_listing(self, stored: dict[int, StoredVersion], previous: Mapping[int, StoredVersion] | None) -> None:
        self.ready = load_plan.settled(previous, stored)
        self.stored = stored


EventListener = Callable[[str, int, State, "ServingError | None"], None]
StoreListener = Callable[[str, "ServingError | None"], None]  # model, why listing failed (None: it worked)
Listing = dict[int, StoredVersion] | ServingError  # a base path's versions, or why it cannot be listed


class ModelManager:
    def __init__(self, options: ManagerOptions, listeners: Sequence[EventListener] = (),
                 loader: Loader = servable_lib.load, store_listeners: Sequence[StoreListener] = ()):
        self.options = options
        self._listeners = list(listeners)
        self._store_listeners = list(store_listeners)
        self._load_servable = loader
        self.storage = Storage(options.cache_dir, options.cache_max_bytes)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._poll_lock = threading.Lock()  # one listing-and-apply pass at a time, so listings apply in order
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

    def _list(self, configs: Iterable[ModelConfig]) -> dict[str, Listing]:
        """Base path -> its versions, or why it cannot be listed. Called without the lock held."""
        listings: dict[str, Listing] = {}
        for config in configs:
            if config.base_path not in listings:
                try:
                    listings[config.base_path] = self.storage.list_versions(config.base_path)
                except ServingError as e:
                    listings[config.base_path] = e
        return listings

    def reload(self, configs: Sequence[ModelConfig]) -> None:
        """Apply a new model list: add, update and remove models; then apply version labels."""
        with self._poll_lock:
            previous, current = self._list_settled(configs)
            with self._lock:
                wanted = {c.name: c for c in configs}
                for name, model in self._models.items():
                    if name not in wanted and not model.removed:
                        log.info("Model %s is no longer configured; unloading it", name)
                        model.removed = True
                        self._reconcile(model)
                for config in configs:
                    model = self._models.get(config.name)
                    if model is None or model.removed:
                        model = self._models[config.name] = Model(config)
                    else:
                        model.config = config
                    model.apply_listing(current[config.base_path], previous.get(config.base_path))
                    self._set_store_error(model, None)
                for config in configs:
                    self._reconcile(self._models[config.name])
        with self._lock:  # not under the poll lock: retries of these loads are resubmitted by the polling thread
            self._wait_settled([c.name for c in configs])
            self._apply_labels(configs)

    def _list_settled(self, configs: Sequence[ModelConfig]) -> tuple[dict, dict[str, dict[int, StoredVersion]]]:
        """(previous, current) listings of every base path; object stores are listed twice, settle_seconds apart.

        Raises the error of a base path that cannot be listed: a reload that names one is refused.
        """
        first = self._list(configs)
        for config in configs:
            listing = first[config.base_path]
            if isinstance(listing, ServingError):
                raise ServingError(listing.code, f"{listing.message} for servable {config.name}")
        if not any(s.settles for listing in first.values() for s in listing.values()):
            return {}, first
        time.sleep(self.options.settle_seconds)
        second = self._list(configs)
        current = {base: first[base] if isinstance(listing, ServingError) else listing
                   for base, listing in second.items()}
        return first, current

    def poll(self) -> None:
        """List every model's base path now and act on what changed (the polling thread calls this too)."""
        with self._poll_lock:
            with self._lock:
                models = [m for m in self._models.values() if not m.removed]
            listings = self._list(m.config for m in models)
            with self._lock:
                for model in models:
                    if model.removed or self._models.get(model.name) is not model:
                        continue
                    listing = listings[model.config.base_path]
                    if isinstance(listing, ServingError):
                        self._set_store_error(model, listing)
                        continue
                    model.apply_listing(listing, model.stored)
                    self._set_store_error(model, None)
                    self._reconcile_safely(model)

    def _set_store_error(self, model: Model, error: ServingError | None) -> None:
        before, model.store_error = model.store_error, error
        if error is not None and (before is None or before.message != error.message):
            log.warning("Cannot list versions of %s: %s; still serving what is loaded", model.name, error.message)
        elif error is None and before is not None:
            log.info("Versions of %s can be listed again (%s)", model.name, model.config.base_path)
        for listener in self._store_listeners:
            try:
                listener(model.name, error)
            except Exception:
                log.exception("Store listener failed")

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
            if self.options.poll_seconds > 0 and time.monotonic() >= self._next_poll:
                self._next_poll = time.monotonic() + self.options.poll_seconds
                self.poll()
            with self._lock:
                for model in list(self._models.values()):
                    self._reconcile_safely(model)

    def _reconcile_safely(self, model: Model) -> None:
        try:
            self._reconcile(model)
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

    def _reconcile(self, model: Model) -> None:
        """Carry out the load plan for `model` against its last listing. Holds the lock."""
        now = time.monotonic()
        held = {v: e.held(now) for v, e in model.versions.items()}
        step = load_plan.plan(held, model.stored, model.ready, model.config.model_version_policy,
                              retiring=model.removed or self._stopping.is_set())
        for version in step.forget:
            del model.versions[version]  # a failed version that changed in storage deserves a new try
        for version in step.load:
            entry = VersionEntry(model.stored[version])
            model.versions[version] = entry
            self._schedule_load(model, entry)
        for version in step.retry:
            entry = model.versions[version]
            entry.retry_at = 0.0
            entry.stored = model.stored.get(version, entry.stored)  # retry what is there now
            self._loader.submit(self._load, model, entry)
        for version in step.abandon:
            entry = model.versions[version]
            entry.retry_at = 0.0
            log.error("Not retrying %s version %d, which is no longer wanted: %s", model.name, version,
                      entry.error.message if entry.error else "")
            self._set_state(model, entry, State.END, entry.error or ServingError(Code.CANCELLED, "no longer wanted"))
        for version in step.unload:
            self._schedule_unload(model, model.versions[version])

    def _schedule_load(self, model: Model, entry: VersionEntry) -> None:
        log.info("Loading %s version %d from %s", model.name, entry.version, entry.path)
        self._set_state(model, entry, State.LOADING)
        self._loader.submit(self._load, model, entry)

    def _load_version(self, model: Model, entry: VersionEntry) -> tuple[servable_lib.Servable, LocalCopy]:
        copy = self.storage.fetch(entry.stored, f"{model.name}-{entry.version}")
        try:
            servable = self._load_servable(model.name, entry.version, copy.path, self.options.load_options)
        except ServingError as e:
            copy.release()
            if copy.path != entry.path:
                raise ServingError(e.code, f"{e.message} (copied from {entry.path})") from None
            raise
        except BaseException:
            copy.release()
            raise
        try:
            if self.options.load_options.warmup:
                warmup.run(servable)
        except BaseException:
            servable.close()
            copy.release()
            raise
        return servable, copy

    def _load(self, model: Model, entry: VersionEntry) -> None:
        started = time.monotonic()
        try:
            servable, copy = self._load_version(model, entry)
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
                log.error("Loading %s version %d failed: %s", model.name, entry.version, e.message)
                self._set_state(model, entry, State.END, e)
                self._reconcile(model)  # fall back to the next wanted version
            return
        with self._lock:
            if model.removed or self._stopping.is_set() or model is not self._models.get(model.name):
                servable.close()
                copy.release()
                self._set_state(model, entry, State.END)
                return
            entry.servable = servable
            entry.copy = copy
            entry.retry_at = 0.0
            log.info("Model %s version %d is AVAILABLE (loaded in %.2fs)", model.name, entry.version,
                     time.monotonic() - started)
            self._set_state(model, entry, State.AVAILABLE)
            self._reconcile(model)  # unload what this version replaces

    def _schedule_unload(self, model: Model, entry: VersionEntry) -> None:
        log.info("Unloading %s version %d", model.name, entry.version)
        entry.begin_unload()
        self._set_state(model, entry, State.UNLOADING)
        self._unloader.submit(self._unload, model, entry)

    def _unload(self, model: Model, entry: VersionEntry) -> None:
        entry.wait_idle(f"{model.name} version {entry.version}")
        servable, entry.servable = entry.servable, None
        copy, entry.copy = entry.copy, None
        if servable is not None:
            servable.close()
        if copy is not None:
            copy.release()
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
                why = f" ({model.store_error.message})" if model.store_error else ""
                raise not_found(f"Could not find any versions of model {name}{why}")
            return [VersionStatus(e.version, e.state, e.error) for e in entries]

    def store_error(self, name: str) -> ServingError | None:
        """Why the model's base path could not be listed at the last poll (None: it was listed)."""
        with self._lock:
            model = self._models.get(name)
            return model.store_error if model is not None else None

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
                self._reconcile(model)
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._unloader.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.storage.close()
