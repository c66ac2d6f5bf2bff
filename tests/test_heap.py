"""The heap settles (garbage collected, the rest frozen) once versions stop changing; freezing never keeps an
unloaded version alive."""

import gc
import shutil
import time
import weakref

import numpy as np

from helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, InProcessServer, copy_model, wait_until
from remote_predict.serving.heap import Heap


class _Cycle:
    def __init__(self):
        self.me = self


def test_changes_in_a_burst_settle_once_and_garbage_is_collected_first():
    heap = Heap(quiet_seconds=0.2)
    try:
        garbage = weakref.ref(_Cycle())  # only the collector frees a cycle
        for _ in range(5):
            heap.changed()
            time.sleep(0.02)
        wait_until(lambda: heap.settles, 10, "the heap to settle")
        time.sleep(0.4)
        assert heap.settles == 1, "a burst of changes settles once, after it"
        assert garbage() is None, "garbage is collected before the rest is frozen"
        assert gc.get_freeze_count() > 0
    finally:
        heap.close()
    assert gc.get_freeze_count() == 0, "closing unfreezes"


def test_a_frozen_object_that_becomes_garbage_is_collected_by_the_settle_after_an_unload():
    heap = Heap(quiet_seconds=0.05)
    try:
        kept = _Cycle()
        ref = weakref.ref(kept)
        heap.settle()
        del kept
        gc.collect()
        assert ref() is not None, "frozen: skipped by the collector"
        heap.changed()  # a load: only what is not frozen yet is walked
        wait_until(lambda: heap.settles == 2, 10, "the settle after a load")
        assert ref() is not None
        heap.changed(unloaded=True)
        wait_until(lambda: heap.settles == 3, 10, "the settle after an unload")
        assert ref() is None, "after an unload a settle unfreezes first"
    finally:
        heap.close()


def test_a_server_settles_after_loading_and_frees_an_unloaded_version(tmp_path):
    base = copy_model(HALF_PLUS_TWO, tmp_path / "model", {"00000123": "1"})
    x = {"x": np.array([[2.0]], np.float32)}
    with InProcessServer(f"--model_base_path={base}", "--model_name=m", "--file_system_poll_wait_seconds=1") as s:
        heap = s.server.heap
        assert heap.settles >= 1, "settled before the ports opened"
        assert gc.get_freeze_count() > 100_000  # TensorFlow's modules and the version's graph
        (first,) = s.server.manager.loaded_servables()
        graph = weakref.ref(first.graph)
        del first
        settled = heap.settles
        shutil.copytree(HALF_PLUS_THREE / "00000123", tmp_path / "staging")
        (tmp_path / "staging").rename(base / "2")
        wait_until(lambda: s.predict("m", x).outputs["y"].float_val == [4.0] and heap.settles > settled, 30,
                   "version 2 to serve and the heap to settle again")
        wait_until(lambda: graph() is None, 20, "version 1's graph to be collected")
        assert s.predict("m", x).outputs["y"].float_val == [4.0]
    assert gc.get_freeze_count() == 0
