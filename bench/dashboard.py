"""Dashboard speed: neuron-page server time (p50) and JSON neuron-endpoint throughput, against uvicorn on loopback.

    python bench/dashboard.py --db data/demo.db                 # the embedded default (after `make demo`)
    python bench/dashboard.py --synthetic /tmp/synthetic.db     # 100,000-neuron synthetic file (built once)
    python bench/dashboard.py --demo-like /tmp/demo-like.db     # the demo's shape, random weights (built once)

The server runs in a subprocess (``uvicorn --factory app.main:app_from_environment``, 1 and 2 workers). Server
time comes from the app's ``Server-Timing`` header over sequential requests for random neurons; throughput from
``wrk`` (``apt-get install wrk``) with a Lua script that asks for a random neuron each request. Prints one JSON
line. Targets (issue): neuron page p50 < 30 ms, JSON endpoint >= 300 requests/s on 2 cores, HTML < 300 KB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent

LUA = """
math.randomseed(%(seed)d)
request = function()
  local layer = math.random(0, %(layers)d - 1)
  local neuron = math.random(0, %(d_mlp)d - 1)
  return wrk.format("GET", "%(prefix)s" .. layer .. "/" .. neuron)
end
"""


def build_demo_like(db: Path, tokens: int = 40_000) -> None:
    """Five random-weight GPT-2s of the embedded family's shape (2 layers, d_model 128, d_mlp 512, ctx 256,
    vocab 4096), precomputed for real, with the test suite's stand-in analysis rows (until zoo/stdlib-tiny ships:
    then measure ``--db data/demo.db``)."""
    sys.path.insert(0, str(ROOT))
    from tests.dashboard_factories import build_atlas
    from tests.factories import tiny_gpt2

    shape = {"n_layers": 2, "d_model": 128, "d_mlp": 512, "n_heads": 4, "ctx": 256}
    folder = db.parent / (db.stem + "-models")
    models = [tiny_gpt2(folder / f"seed-{seed}", seed=seed, vocab_size=4096, **shape) for seed in range(5)]
    build_atlas(db, models, tokens=tokens, threshold=0.5)


def reference_model(db: Path) -> dict[str, Any]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT m.name, m.n_layers, m.d_mlp, (SELECT count(*) FROM neurons n WHERE n.model_id = m.id) "
            "FROM models m JOIN runs r ON r.id = m.run_id WHERE r.status = 'complete' "
            "ORDER BY r.id DESC, m.position LIMIT 1"
        ).fetchone()
    if row is None:
        raise SystemExit(f"{db} has no complete run")
    return {"name": row[0], "n_layers": row[1], "d_mlp": row[2], "neurons": row[3]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(db: Path, workers: int, immutable: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "UNA_DB_PATH": str(db), "UNA_IMMUTABLE": str(immutable).lower()}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:app_from_environment",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/v1/health")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def sample(port: int, paths: list[str], accept: str) -> dict[str, float]:
    """Sequential requests on one keep-alive connection: server time (Server-Timing) and wall time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    server, wall, sizes = [], [], []
    for path in paths:
        started = time.perf_counter()
        conn.request("GET", path, headers={"Accept": accept})
        response = conn.getresponse()
        body = response.read()
        wall.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            raise SystemExit(f"GET {path}: {response.status} {body[:200]!r}")
        timing = re.search(r"dur=([0-9.]+)", response.getheader("server-timing", ""))
        server.append(float(timing.group(1)) if timing else float("nan"))
        sizes.append(len(body))
    conn.close()
    server.sort()
    return {
        "server_p50_ms": round(statistics.median(server), 2),
        "server_p90_ms": round(server[int(0.9 * (len(server) - 1))], 2),
        "wall_p50_ms": round(statistics.median(wall), 2),
        "bytes_max": max(sizes),
        "bytes_median": int(statistics.median(sizes)),
    }


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, cpu in times.items():
        ancestor = pid
        while ancestor not in (0, 1) and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root:
            total += cpu
    return total


def wrk(
    port: int, prefix: str, model: dict[str, Any], duration: int, connections: int, threads: int, server_pid: int
) -> dict:
    if shutil.which("wrk") is None:
        return {"error": "wrk not installed (apt-get install wrk)"}
    script = Path(tempfile.mkdtemp()) / "random.lua"
    script.write_text(LUA % {"seed": 7, "layers": model["n_layers"], "d_mlp": model["d_mlp"], "prefix": prefix})
    cpu_before = tree_cpu_seconds(server_pid)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    server_cpu = tree_cpu_seconds(server_pid) - cpu_before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, flags=re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    cpu_ms = 1000 * server_cpu / max(requests, 1)
    return {
        "requests_per_s": rps,
        "latency": latency,
        "non_2xx": int(errors.group(1)) if errors else 0,
        # Under load from other processes the measured rate depends on the CPU share the server got; the server's
        # own CPU per request gives the rate two dedicated cores would sustain.
        "server_cpu_ms_per_request": round(cpu_ms, 3),
        "requests_per_s_on_2_dedicated_cores": round(2000 / cpu_ms, 1) if cpu_ms else None,
    }


def machine() -> dict[str, Any]:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else "?"
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", type=Path, help="an existing atlas file")
    source.add_argument("--synthetic", type=Path, help="a synthetic 100,000-neuron file (built if missing)")
    source.add_argument(
        "--demo-like",
        type=Path,
        help="a real precompute of 5 random-weight models of the embedded family's shape (built if missing)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=200, help="sequential requests for the p50")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk load")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (it shares the 2 cores)")
    parser.add_argument("--immutable", action="store_true", help="serve with immutable=1 (a finished file)")
    args = parser.parse_args(argv)
    db = args.db
    if args.synthetic:
        db = args.synthetic
        if not db.exists():
            sys.path.insert(0, str(ROOT))
            from bench.synthetic_db import build

            build(db)
    if args.demo_like:
        db = args.demo_like
        if not db.exists():
            build_demo_like(db)
    model = reference_model(db)
    rng = random.Random(0)
    picks = [(rng.randrange(model["n_layers"]), rng.randrange(model["d_mlp"])) for _ in range(args.samples)]
    name = quote(model["name"], safe="")
    results: dict[str, Any] = {
        "bench": "dashboard",
        "db": str(db),
        "model": model,
        "machine": machine(),
        "immutable": args.immutable,
    }
    for workers in args.workers:
        process, port = start_server(db, workers, args.immutable)
        try:
            warm = [f"/models/{name}/neurons/{layer}/{neuron}" for layer, neuron in picks[:20]]
            sample(port, warm, "text/html")
            html = sample(port, [f"/models/{name}/neurons/{layer}/{neuron}" for layer, neuron in picks], "text/html")
            api = sample(
                port, [f"/api/v1/models/{name}/neurons/{layer}/{neuron}" for layer, neuron in picks], "application/json"
            )
            load = wrk(
                port,
                f"/api/v1/models/{name}/neurons/",
                model,
                args.duration,
                args.connections,
                args.threads,
                process.pid,
            )
            page_load = wrk(
                port, f"/models/{name}/neurons/", model, args.duration, args.connections, args.threads, process.pid
            )
            results[f"workers_{workers}"] = {
                "neuron_page": html,
                "neuron_json": api,
                "json_load": load,
                "page_load": page_load,
            }
        finally:
            process.terminate()
            process.wait(timeout=20)
    results["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
