"""What the manager does next for one model: a pure function of the versions it holds (and their states),
what storage lists, and the version policy. No TensorFlow, no threads, no clock: tests call it directly.

The rules, in the order they apply:
- A model that is removed (or a server that stops) unloads every AVAILABLE version, and nothing else.
- A version is *ready* to be loaded when storage lists it complete. Local directories are ready as soon
  as they appear (tools rename them into place). Object stores have no rename: an object version is
  ready once it has its `saved_model.pb` and its listing (keys, sizes, ETags) did not change between two
  polls. A version already loading or loaded stays a candidate while it is listed, even if its objects
  are being rewritten, so a rewrite never makes the model swap back and forth.
- A version that failed to load is forgotten when storage no longer lists it, or lists different
  content (its fingerprint changed): it gets a fresh try.
- The policy picks the wanted versions among the candidates, leaving out those that failed.
- Wanted versions not held (or held but cleanly unloaded) are loaded; wanted versions waiting to retry a
  load whose time has come are retried; versions waiting to retry that are no longer wanted are
  abandoned (they end with their last error instead of waiting forever).
- Versions no longer wanted are unloaded only once a wanted version is AVAILABLE, or nothing wanted is
  still on its way: never a gap.
- When storage lists nothing, nothing changes: what is loaded keeps serving.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from remote_predict.serving import version_policy
from remote_predict.serving.storage import StoredVersion


class State(Enum):
    """A version's state, named as in GetModelStatus (ModelVersionStatus.State)."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


@dataclass(frozen=True)
class Held:
    """What the manager holds of one version."""

    state: State
    failed: bool = False  # END because it failed to load (retries exhausted)
    fingerprint: object = None  # of the stored version it was loaded (or failed) from
    retry_due: bool = False  # LOADING, waiting to retry a failed load, and the time to retry has come
    retrying: bool = False  # LOADING, waiting to retry a failed load (due or not)


@dataclass(frozen=True)
class Plan:
    forget: tuple[int, ...] = ()  # failed versions to drop: they are gone from storage or were replaced
    load: tuple[int, ...] = ()  # new loads (these versions get a fresh entry)
    retry: tuple[int, ...] = ()  # loads to try again now
    abandon: tuple[int, ...] = ()  # loads waiting to retry that are no longer wanted: they end failed
    unload: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.forget or self.load or self.retry or self.abandon or self.unload)


def settled(previous: Mapping[int, StoredVersion] | None, current: Mapping[int, StoredVersion]) -> frozenset[int]:
    """The versions of `current` that are complete: ready to be loaded."""
    ready = set()
    for version, stored in current.items():
        if not stored.complete:
            continue
        if stored.settles:
            before = (previous or {}).get(version)
            if before is None or before.fingerprint != stored.fingerprint:
                continue
        ready.add(version)
    return frozenset(ready)


def plan(held: Mapping[int, Held], stored: Mapping[int, StoredVersion], ready: Collection[int],
         policy: version_policy.VersionPolicy, retiring: bool = False) -> Plan:
    """The next steps for one model; see the module's docstring for the rules."""
    if retiring:
        return Plan(unload=_sorted(v for v, h in held.items() if h.state is State.AVAILABLE))
    forget = _sorted(v for v, h in held.items()
                     if h.failed and (v not in stored or stored[v].fingerprint != h.fingerprint))
    if not stored:
        return Plan(forget=forget)
    live = {v for v, h in held.items() if h.state in (State.LOADING, State.AVAILABLE)}
    candidates = {v for v in stored if v in ready or v in live}
    failed = {v for v, h in held.items() if h.failed and v not in forget}
    aspired = version_policy.aspired_versions(policy, candidates, failed)
    load, retry, on_the_way = [], [], set()
    for version in sorted(aspired, reverse=True):
        entry = None if version in forget else held.get(version)
        if entry is None or (entry.state is State.END and not entry.failed):
            load.append(version)
            on_the_way.add(version)
        elif entry.state in (State.START, State.LOADING):
            on_the_way.add(version)
            if entry.retry_due:
                retry.append(version)
    abandon = _sorted(v for v, h in held.items() if v not in aspired and h.state is State.LOADING and h.retrying)
    ready_now = any(held[v].state is State.AVAILABLE for v in aspired if v in held and v not in forget)
    unload: tuple[int, ...] = ()
    if ready_now or not on_the_way:
        unload = _sorted(v for v, h in held.items() if v not in aspired and h.state is State.AVAILABLE)
    return Plan(forget=forget, load=tuple(load), retry=tuple(retry), abandon=abandon, unload=unload)


def _sorted(versions) -> tuple[int, ...]:
    return tuple(sorted(versions))
