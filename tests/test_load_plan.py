"""The manager's plan, called directly: what to load, retry, abandon, forget and unload next. No TensorFlow."""

from google.protobuf import text_format

from remote_predict.serving.load_plan import Held, Plan, State, plan, settled
from remote_predict.serving.storage import StoredVersion
from remote_predict.serving.version_policy import VersionPolicy

LATEST = VersionPolicy()
ALL = text_format.Parse("all {}", VersionPolicy())
LATEST_2 = text_format.Parse("latest { num_versions: 2 }", VersionPolicy())


def local(*versions: int) -> dict[int, StoredVersion]:
    return {v: StoredVersion(v, f"/m/{v}", fingerprint=v) for v in versions}


def s3(version: int, *keys: str) -> StoredVersion:
    from remote_predict.serving.s3_store import StoredObject

    objects = tuple(StoredObject(k, 10, f'"{k}"') for k in sorted(keys))
    return StoredVersion(version, f"s3://b/m/{version}", fingerprint=objects,
                         complete="saved_model.pb" in keys, settles=True, objects=objects)


def test_first_listing_loads_the_newest_version():
    stored = local(1, 2, 3)
    assert plan({}, stored, settled(None, stored), LATEST) == Plan(load=(3,))
    assert plan({}, stored, settled(None, stored), ALL) == Plan(load=(3, 2, 1))


def test_old_version_unloads_only_once_the_new_one_is_available():
    stored = local(1, 2)
    loading = {1: Held(State.AVAILABLE), 2: Held(State.LOADING, fingerprint=2)}
    assert plan(loading, stored, {1, 2}, LATEST) == Plan(), "no gap: 1 stays while 2 loads"
    loaded = {1: Held(State.AVAILABLE), 2: Held(State.AVAILABLE, fingerprint=2)}
    assert plan(loaded, stored, {1, 2}, LATEST) == Plan(unload=(1,))


def test_a_failed_version_falls_back_and_is_retried_when_replaced():
    stored = local(1, 2)
    held = {1: Held(State.END), 2: Held(State.END, failed=True, fingerprint=2)}
    assert plan(held, stored, {1, 2}, LATEST) == Plan(load=(1,)), "the policy falls back to version 1"
    replaced = {1: stored[1], 2: StoredVersion(2, "/m/2", fingerprint="new")}
    assert plan(held, replaced, {1, 2}, LATEST) == Plan(forget=(2,), load=(2,))
    assert plan(held, local(1), {1}, LATEST) == Plan(forget=(2,), load=(1,)), "gone from storage: forgotten"


def test_retries_when_due_and_abandons_what_is_no_longer_wanted():
    stored = local(1, 2)
    waiting = {1: Held(State.AVAILABLE), 2: Held(State.LOADING, fingerprint=2, retrying=True)}
    assert plan(waiting, stored, {1, 2}, LATEST) == Plan()
    due = {1: Held(State.AVAILABLE), 2: Held(State.LOADING, fingerprint=2, retrying=True, retry_due=True)}
    assert plan(due, stored, {1, 2}, LATEST) == Plan(retry=(2,))
    # Version 2 deleted while it waits to retry: it ends (failed) instead of waiting forever.
    assert plan(due, local(1), {1}, LATEST) == Plan(abandon=(2,))


def test_nothing_listed_changes_nothing():
    held = {3: Held(State.AVAILABLE, fingerprint=3)}
    assert plan(held, {}, frozenset(), LATEST) == Plan()
    assert not plan(held, {}, frozenset(), LATEST)


def test_retiring_unloads_every_available_version():
    held = {1: Held(State.AVAILABLE), 2: Held(State.LOADING), 3: Held(State.AVAILABLE)}
    assert plan(held, local(1, 2, 3), {1, 2, 3}, LATEST_2, retiring=True) == Plan(unload=(1, 3))


def test_a_deleted_version_unloads_once_the_replacement_is_available():
    held = {2: Held(State.AVAILABLE, fingerprint=2)}
    assert plan(held, local(1), {1}, LATEST) == Plan(load=(1,))
    held = {1: Held(State.AVAILABLE, fingerprint=1), 2: Held(State.AVAILABLE, fingerprint=2)}
    assert plan(held, local(1), {1}, LATEST) == Plan(unload=(2,))


def test_object_versions_settle_over_two_listings_with_their_saved_model():
    first = {1: s3(1, "saved_model.pb", "variables/variables.index"), 2: s3(2, "variables/variables.index")}
    assert settled(None, first) == set(), "a first listing proves nothing about an object version"
    assert settled(first, first) == {1}, "version 2 has no saved_model.pb yet"
    growing = {**first, 2: s3(2, "variables/variables.index", "saved_model.pb")}
    assert settled(first, growing) == {1}, "version 2 changed since the last listing"
    assert settled(growing, growing) == {1, 2}
    # Local directories are ready at once (they are renamed into place).
    assert settled(None, local(1, 2)) == {1, 2}


def test_an_object_version_still_uploading_is_not_loaded_but_a_loaded_one_being_rewritten_stays():
    stored = {1: s3(1, "saved_model.pb"), 2: s3(2, "saved_model.pb")}
    held = {1: Held(State.AVAILABLE, fingerprint=stored[1].fingerprint)}
    assert plan(held, stored, {1}, LATEST) == Plan(), "2 is not settled: 1 keeps serving, nothing loads"
    assert plan(held, stored, {1, 2}, LATEST) == Plan(load=(2,))
    # Version 1 being rewritten in place (not settled) while loaded: it stays, no swap back and forth.
    rewritten = {1: s3(1, "saved_model.pb", "extra")}
    assert plan(held, rewritten, set(), LATEST) == Plan()
