"""Tokens/s of the `local` (transformers) and `vllm` backends on one GPU, with a model of
the Llama-3-8B shape and random weights (the speed of real weights; the answers are
noise, so no agreement is checked beyond the first tokens).

    python benchmarks/bench_engines_gpu.py [--requests 256] [--max-new-tokens 256] \
        [--batch-size 32] [--workdir /tmp/llama8b-random] [--tokenizer resources/models/smollm2-135m-instruct]

The random model is built once into --workdir (config + bfloat16 safetensors, ~16 GB)
and reused. Each engine runs in its own process, one after the other (local, then
vllm), on the same evaluation-shaped requests (`<think>` prefill, greedy reasoning,
three answer options scored); printed: load/start-up time, requests/s and generated
tokens/s (scoring included), and the ratio. Needs the GPU build of vLLM (`pip install
vllm`) next to the project.
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

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def build_model(workdir: Path, tokenizer_dir: str) -> None:
    """Config, tokenizer (any chat tokenizer: ids stay below the vocabulary size) and
    random bfloat16 weights, written once."""
    if (workdir / "model.safetensors.index.json").exists() or (workdir / "model.safetensors").exists():
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type", "torch_dtype")},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):  # the usual initialisation: normal(0, 0.02) matrices, unit norms
        model = LlamaForCausalLM(config)
    model.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    print(f"random Llama-8B written to {workdir} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def build_requests(n: int, max_new_tokens: int):
    """`n` distinct questions, asked as the evaluation asks a local model (task de3)."""
    from synthpert.core.settings import Generation
    from synthpert.evaluation.answers import question_request

    generation = Generation(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, reasoning_effort=None)
    return [
        question_request({"qid": str(i), "cell": "k562", "pert": f"GENE{i}", "gene": f"TARGET{i % 97}"}, "de3", generation, local=True)
        for i in range(n)
    ]


def worker(args) -> None:
    from synthpert.llm.requests import RequestLog

    from synthpert.core.config import model_entry
    from synthpert.core.settings import Model

    def spec(**entry) -> Model:
        return Model.of(model_entry({"model": args.workdir, "dtype": "bfloat16", **entry}))

    requests = build_requests(args.requests, args.max_new_tokens)
    started = time.perf_counter()
    if args.worker == "local":
        from synthpert.llm.local import LocalBackend

        backend = LocalBackend(spec(backend="local", batch_size=args.batch_size))
    else:
        from synthpert.llm.vllm_engine import VLLMBackend

        backend = VLLMBackend(spec(backend="vllm", engine={"max_model_len": 4096, "gpu_memory_utilization": 0.85, "max_num_seqs": 256}))
        backend.engine.start()
    startup = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        answers = backend.run(requests, RequestLog(Path(tmp) / "log.jsonl"), desc=args.worker)
        elapsed = time.perf_counter() - t0
    if hasattr(backend, "close"):
        backend.close()
    ordered = [answers[r.key(backend.model)] for r in requests]
    Path(args.out).write_text(json.dumps({
        "startup_s": startup, "e2e_s": elapsed, "requests": len(requests),
        "generated_tokens": sum(a.completion_tokens for a in ordered),
        "first_texts": [a.text[:60] for a in ordered[:4]],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="local backend batch size")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "llama8b-random"))
    parser.add_argument("--tokenizer", default="resources/models/smollm2-135m-instruct")
    parser.add_argument("--engines", default="local,vllm")
    parser.add_argument("--worker", choices=["local", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    build_model(workdir, args.tokenizer)
    results = {}
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", engine, "--out", str(out), "--workdir", str(workdir),
                   "--requests", str(args.requests), "--max-new-tokens", str(args.max_new_tokens),
                   "--batch-size", str(args.batch_size)]
            subprocess.run(cmd, check=True, stdout=sys.stderr)
            r = results[engine] = json.loads(out.read_text())
        print(f"{engine:5s} start-up {r['startup_s']:6.1f} s | {r['requests']} requests in {r['e2e_s']:7.1f} s = "
              f"{r['requests'] / r['e2e_s']:7.2f} req/s, {r['generated_tokens'] / r['e2e_s']:8.1f} gen tok/s", flush=True)
    if {"local", "vllm"} <= results.keys():
        local, vllm = results["local"], results["vllm"]
        print(f"vllm / local: {(vllm['generated_tokens'] / vllm['e2e_s']) / (local['generated_tokens'] / local['e2e_s']):.1f}x "
              f"generated tokens/s, {local['e2e_s'] / vllm['e2e_s']:.1f}x requests/s")


if __name__ == "__main__":
    main()
