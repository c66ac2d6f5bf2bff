"""`remote-predict bench` and the benchmark suite, run for real (figures are printed, never asserted)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import HALF_PLUS_TWO, REPO, InProcessServer
from remote_predict.tools import bench


@pytest.fixture(scope="module")
def server():
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two") as s:
        yield s


def test_grpc_levels_with_json_csv_and_plot(server, tmp_path, capsys):
    code = bench.main([f"--target={server.address}", "--model=half_plus_two", "--concurrency=1,4",
                       "--duration=1", "--warmup=0.2", f"--json={tmp_path / 'r.json'}",
                       f"--csv={tmp_path / 'r.csv'}", f"--plot={tmp_path / 'r.png'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "requests/s" in out and "machine:" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["rps"] > 0 and level["errors"] == {} and level["p50_ms"] <= level["p99_ms"]
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("concurrency,requests")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rest_with_an_input_file_and_errors_by_code(server, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.array([[1.0], [2.0]], np.float32))
    assert bench.main([f"--target=127.0.0.1:{server.rest_port}", "--protocol=rest", "--model=half_plus_two",
                       "--concurrency=2", "--duration=1", "--warmup=0.2", f"--input=x={tmp_path / 'x.npy'}",
                       f"--json={tmp_path / 'r.json'}"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["levels"][0]["rps"] > 0
    np.save(tmp_path / "bad.npy", np.array([1, 2], np.int64))  # the model takes float: every request fails
    bench.main([f"--target={server.address}", "--model=half_plus_two", "--concurrency=1", "--duration=0.5",
                "--warmup=0", f"--input=x={tmp_path / 'bad.npy'}", f"--json={tmp_path / 'bad.json'}"])
    level = json.loads((tmp_path / "bad.json").read_text())["levels"][0]
    assert set(level["errors"]) == {"INVALID_ARGUMENT"} and level["errors"]["INVALID_ARGUMENT"] > 0


@pytest.mark.timeout(900)  # about 2 minutes here: a margin for a slower machine
def test_benchmark_suite_quick_run_completes():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "suite.py"), "--quick"], capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for scenario in ("1. floor", "2. direct Predict, gRPC", "2. direct Predict, REST", "3. hop overhead",
                     "3. one hop to another server over tcp://", "4. fan-out to 4 shard(s)", "5. bulk 16 MiB",
                     "6. half_plus_two, batching on"):
        assert scenario in result.stdout, result.stdout


def test_hedging_benchmark_quick_run_completes():
    """The hedging benchmark runs end to end (flags, pauses, metrics) and prints a row per setting."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "hedging.py"), "--quick", "--delays=0,5",
                             "--percentiles=95"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("| no pauses | off |", "| no pauses | 5 ms |", "| B paused | off |", "| B paused | p95 |"):
        assert row in result.stdout, result.stdout


def test_idle_gaps_benchmark_runs_its_three_paths():
    """The idle-gaps benchmark splits, serves and calls a shard and the unsplit model (every answer must be OK,
    or it fails), and prints a row per gap with a figure for each path."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "idle_gaps.py"), "--rounds=1", "--calls=30",
                             "--gaps=0,1", "--users=20000", "--items=4000"], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 0 ms |", "| 1 ms |"))]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 5 and all(cell.endswith("x)") for cell in cells[1:4]), row
