"""Throughput of the openai backend against the local fake server (tests/fake_openai.py).

The server runs in its own process, so the figure is the client's alone.
Every answer takes `delay` seconds on the server, so with `concurrency` requests in
flight the best possible rate is concurrency / delay. The backend should reach at
least 90% of it (the rest is HTTP, JSON and the fsync of every log line).

    python benchmarks/bench_openai_throughput.py [--concurrency 16] [--delay 0.2] [--requests 480]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthpert.core.config import model_entry
from synthpert.core.settings import Model
from synthpert.llm.backends import make_backend
from synthpert.llm.requests import Request, RequestLog

FAKE_SERVER = Path(__file__).resolve().parents[1] / "tests" / "fake_openai.py"


def settings_of(entry: dict) -> Model:
    return Model.of(model_entry(entry))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.2, help="server seconds per answer")
    parser.add_argument("--requests", type=int, default=480)
    args = parser.parse_args()

    os.environ["SYNTHPERT_BENCH_KEY"] = "sk-bench"
    requests = [Request(messages=(("user", f"question {i}"),), max_new_tokens=64) for i in range(args.requests)]
    server = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), "--delay", str(args.delay)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    base_url = server.stdout.readline().strip()
    with tempfile.TemporaryDirectory() as tmp:
        backend = make_backend(
            settings_of({
                "backend": "openai",
                "model": "bench",
                "base_url": base_url,
                "api_key_env": "SYNTHPERT_BENCH_KEY",
                "max_concurrency": args.concurrency,
                "max_retries": 0,
                "timeout_s": 60,
            })
        )
        # Warm-up (not timed): the first requests build the SDK's lazy imports and models.
        warmup = [Request(messages=(("user", f"warm-up {i}"),)) for i in range(args.concurrency)]
        backend.run(warmup, RequestLog(Path(tmp) / "warmup.jsonl"), desc="warm-up")
        start = time.perf_counter()
        results = backend.run(requests, RequestLog(Path(tmp) / "log.jsonl"), desc="bench")
        elapsed = time.perf_counter() - start
    server.stdin.close()
    server.wait()
    failed = [r.error for r in results.values() if r.finish_reason != "stop"]
    if len(results) != args.requests or failed:
        sys.exit(f"{len(results)} of {args.requests} answered, {len(failed)} failed: {failed[:3]}")

    achieved = args.requests / elapsed
    ideal = args.concurrency / args.delay
    print(f"requests {args.requests}, concurrency {args.concurrency}, server delay {args.delay:g} s")
    print(f"wall time          {elapsed:.2f} s")
    print(f"achieved           {achieved:.1f} requests/s")
    print(f"ideal (C / delay)  {ideal:.1f} requests/s")
    print(f"ratio              {achieved / ideal:.1%} (target >= 90%)")


if __name__ == "__main__":
    main()
