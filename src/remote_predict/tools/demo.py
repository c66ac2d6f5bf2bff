"""`remote-predict demo`: the seed's walk-through, end to end, with our commands in place of Bazel and Docker.

1. export half_plus_two_with_rpop (its RemotePredict op calls half_plus_two at localhost:PORT);
2. write half_plus_two (y = 0.5 x + 2) next to it;
3. write the seed's /tmp/config_file.txt;
4. start `remote-predict serve --port=8500 --rest_api_port=8501 --model_config_file=/tmp/config_file.txt`
   (on 127.0.0.1 unless --host says otherwise);
5. send the seed's request and print the answer, then stop the server (or keep serving with --keep_serving).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

CONFIG = """model_config_list {{
  config: {{
    name: "half_plus_two"
    base_path: "{root}/half_plus_two"
    model_platform: "tensorflow"
  }}
  config: {{
    name: "half_plus_two_with_rpop"
    base_path: "{root}/half_plus_two_with_rpop"
    model_platform: "tensorflow"
  }}
}}
"""
REQUEST = {"instances": [1.0, 2.0, 5.0]}
EXPECTED = {"predictions": [3.5, 4.0, 5.5]}


def _post(url: str, body: dict, timeout: float = 10.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer {url} within {timeout:.0f}s")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="remote-predict demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp", help="where models and config_file.txt go (default: /tmp)")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--rest_api_port", type=int, default=8501)
    parser.add_argument("--host", default="127.0.0.1", help="address the server binds (default: loopback only)")
    parser.add_argument("--keep_serving", action="store_true", help="leave the server running (Ctrl-C stops it)")
    args = parser.parse_args(argv)

    from remote_predict.tools import export  # imports TensorFlow

    root = os.path.abspath(args.root)
    step = "[demo]"
    print(f"{step} exporting the seed's models under {root}", flush=True)
    export.export_half_plus_two_with_rpop(f"{root}/half_plus_two_with_rpop/1", f"localhost:{args.port}")
    export.export_half_plus_two(f"{root}/half_plus_two/00000123")
    config_path = f"{root}/config_file.txt"
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(CONFIG.format(root=root))
    flags = [f"--port={args.port}", f"--rest_api_port={args.rest_api_port}", f"--model_config_file={config_path}",
             f"--host={args.host}"]
    print(f"{step} remote-predict serve {' '.join(flags)}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "remote_predict", "serve", *flags])
    try:
        base = f"http://localhost:{args.rest_api_port}/v1/models"
        _wait_ready(f"{base}/half_plus_two_with_rpop", server, timeout=120)
        print(f"{step} curl -d '{json.dumps(REQUEST)}' -X POST {base}/half_plus_two_with_rpop:predict", flush=True)
        status, answer = _post(f"{base}/half_plus_two_with_rpop:predict", REQUEST)
        print(json.dumps(answer), flush=True)
        if status != 200 or answer != EXPECTED:
            print(f"{step} FAILED: expected {json.dumps(EXPECTED)} (HTTP 200), got HTTP {status}", flush=True)
            return 1
        print(f"{step} OK: b came from a RemotePredict call to half_plus_two (x = 2.0 -> 3.0), "
              "so y = 0.5 x + 3", flush=True)
        if args.keep_serving:
            print(f"{step} serving on ports {args.port} (gRPC) and {args.rest_api_port} (REST); Ctrl-C stops",
                  flush=True)
            server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
