"""The same evaluation requests through the `local` (transformers) and `vllm` backends.

Each run is its own process (an idle vLLM engine keeps a core busy, and the two must not
share the machine), the runs alternate local, vllm, local, vllm ... (`--repeats`), and
both use `--threads` threads (torch.set_num_threads for local; VLLM_CPU_OMP_THREADS_BIND
for vLLM on CPU). Every run answers the same `--questions` three-class questions the way
the evaluation asks a local model (a `<think>` prefill, `--max-new-tokens` of greedy
reasoning, then the probabilities of the three answers), then scores the same questions
again by likelihood alone (max_new_tokens=0: the scoring cost on its own). Printed:
start-up (model load, or engine start), end-to-end requests/s and generated tokens/s
(scoring included, start-up excluded), the likelihood-only scoring time, the ratios,
and the agreement of the two engines (greedy texts, and the argmax of the option
probabilities).

    python benchmarks/bench_engines.py --model resources/models/smollm2-135m-instruct \
        [--questions 96] [--max-new-tokens 256] [--threads 2] [--batch-size 8] [--repeats 1]

Needs an environment with both engines (the CPU build is the `vllm-cpu` package).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "perturbqa-demo"


def build_requests(n: int, max_new_tokens: int):
    """`n` test questions of the demo data, asked exactly as the evaluation asks a local
    model (`evaluation.answers.question_request`, task de3), spread over the cell lines."""
    import polars as pl

    from synthpert.core.settings import Generation
    from synthpert.evaluation.answers import qid_expr, question_request

    frames = [
        pl.read_csv(path).filter(pl.col("split") == "test").with_columns(cell=pl.lit(path.name.removesuffix("-de.csv")))
        for path in sorted(DATA.glob("*-de.csv"))
    ]
    rows = pl.concat(frames, how="diagonal_relaxed").sort("cell", "pert", "gene").with_columns(qid=qid_expr())
    if rows.height < n:
        raise SystemExit(f"only {rows.height} test questions in {DATA}")
    generation = Generation(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, reasoning_effort=None)
    return [question_request(q, "de3", generation, local=True) for q in rows.gather_every(rows.height // n).head(n).iter_rows(named=True)]


def worker(args) -> None:
    """One run of one engine; writes its figures and answers as JSON to --out."""
    import dataclasses

    from synthpert.llm.requests import Request, RequestLog

    from synthpert.core.config import model_entry
    from synthpert.core.settings import Model

    def spec(**entry) -> Model:
        return Model.of(model_entry({"model": args.model, "dtype": "float32", **entry}))

    requests = build_requests(args.questions, args.max_new_tokens)
    scoring_only = [Request(**{**dataclasses.asdict(r), "max_new_tokens": 0}) for r in requests]
    started = time.perf_counter()
    if args.worker == "local":
        import torch

        torch.set_num_threads(args.threads)
        from synthpert.llm.local import LocalBackend

        backend = LocalBackend(spec(backend="local", batch_size=args.batch_size))
    else:
        from synthpert.llm.vllm_engine import VLLMBackend

        engine = {"max_model_len": args.max_model_len, "cpu_threads": args.threads, "kv_cache_space": args.kv_cache_space,
                  "block_size": args.block_size or None}  # fmt: skip
        backend = VLLMBackend(spec(backend="vllm", engine=engine))
        backend.engine.start()
    startup = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        answers = backend.run(requests, RequestLog(Path(tmp) / "run.jsonl"), desc=f"{args.worker} e2e")
        t1 = time.perf_counter()
        scored = backend.run(scoring_only, RequestLog(Path(tmp) / "score.jsonl"), desc=f"{args.worker} scoring")
        t2 = time.perf_counter()
    if hasattr(backend, "close"):
        backend.close()
    ordered = [answers[r.key(backend.model)] for r in requests]
    result = {
        "engine": args.worker,
        "batch_size": args.batch_size if args.worker == "local" else None,
        "startup_s": startup,
        "e2e_s": t1 - t0,
        "scoring_s": t2 - t1,
        "requests": len(requests),
        "generated_tokens": sum(a.completion_tokens for a in ordered),
        "texts": [a.text for a in ordered],
        "argmax": [max(a.option_logprobs, key=a.option_logprobs.get) for a in ordered],
        "scores": [a.option_logprobs for a in ordered],
        "argmax_scoring_only": [max(s.option_logprobs, key=s.option_logprobs.get)
                                for s in (scored[r.key(backend.model)] for r in scoring_only)],
    }
    Path(args.out).write_text(json.dumps(result))


def run_once(args, engine: str, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", engine, "--out", str(out), "--model", args.model,
               "--questions", str(args.questions), "--max-new-tokens", str(args.max_new_tokens),
               "--threads", str(args.threads), "--batch-size", str(batch_size),
               "--max-model-len", str(args.max_model_len), "--kv-cache-space", str(args.kv_cache_space),
               "--block-size", str(args.block_size)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        print(f"--- {engine}" + (f" (batch {batch_size})" if engine == "local" else ""), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr if args.quiet else None)
        result = json.loads(out.read_text())
    line = (f"{engine:5s}{'' if engine != 'local' else f' b{batch_size}':4s} start-up {result['startup_s']:6.1f} s | "
            f"e2e {result['e2e_s']:7.1f} s = {result['requests'] / result['e2e_s']:6.3f} req/s, "
            f"{result['generated_tokens'] / result['e2e_s']:7.1f} gen tok/s | scoring only {result['scoring_s']:6.1f} s")
    print(line, flush=True)
    return result


def agreement(a: list, b: list) -> float:
    return 100.0 * sum(x == y for x, y in zip(a, b)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resources/models/smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", default="8", help="local batch size(s), comma-separated: the best counts")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (local, vllm)")
    parser.add_argument("--engines", default="local,vllm")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-space", type=int, default=4, help="vLLM CPU KV cache, GiB")
    parser.add_argument("--block-size", type=int, default=0, help="vLLM KV block size (0: vLLM's default)")
    parser.add_argument("--quiet", action="store_true", help="send the workers' output to stderr")
    parser.add_argument("--worker", choices=["local", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.model = str(Path(args.model).resolve())
    engines = args.engines.split(",")
    print(f"{args.questions} questions, {args.max_new_tokens} reasoning tokens, {args.threads} threads, "
          f"float32, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(args.repeats):
        for engine in engines:
            sizes = [int(b) for b in args.batch_size.split(",")] if engine == "local" else [0]
            for size in sizes:
                results[engine].append(run_once(args, engine, size))
    if len(engines) < 2:
        return
    local = min(results["local"], key=lambda r: r["e2e_s"])
    vllm = min(results["vllm"], key=lambda r: r["e2e_s"])
    print("\nbest of each (start-up excluded)")
    print(f"  requests/s         local {local['requests'] / local['e2e_s']:.3f}  vllm {vllm['requests'] / vllm['e2e_s']:.3f}"
          f"  ratio {local['e2e_s'] / vllm['e2e_s']:.2f}x")
    print(f"  generated tokens/s local {local['generated_tokens'] / local['e2e_s']:.1f}  "
          f"vllm {vllm['generated_tokens'] / vllm['e2e_s']:.1f}"
          f"  ratio {(vllm['generated_tokens'] / vllm['e2e_s']) / (local['generated_tokens'] / local['e2e_s']):.2f}x")
    print(f"  scoring only       local {local['scoring_s']:.1f} s  vllm {vllm['scoring_s']:.1f} s"
          f"  ratio {local['scoring_s'] / vllm['scoring_s']:.2f}x")
    print(f"  start-up           local {local['startup_s']:.1f} s  vllm {vllm['startup_s']:.1f} s")
    print(f"  with start-up      local {local['e2e_s'] + local['startup_s']:.1f} s  "
          f"vllm {vllm['e2e_s'] + vllm['startup_s']:.1f} s")
    diffs = [abs(a[o] - b[o]) for a, b in zip(local["scores"], vllm["scores"]) for o in a]
    print("agreement (local vs vllm)")
    print(f"  greedy texts identical {agreement(local['texts'], vllm['texts']):.1f}%")
    print(f"  option argmax          {agreement(local['argmax'], vllm['argmax']):.1f}% after reasoning, "
          f"{agreement(local['argmax_scoring_only'], vllm['argmax_scoring_only']):.1f}% likelihood only")
    print(f"  option log-prob |diff| max {max(diffs):.2e} (where texts agree: "
          f"{max((abs(a[o] - b[o]) for a, b, ta, tb in zip(local['scores'], vllm['scores'], local['texts'], vllm['texts']) if ta == tb for o in a), default=float('nan')):.2e})")


if __name__ == "__main__":
    main()
