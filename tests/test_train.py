"""`synthpert train`: the loss covers the reasoning, training runs, resumes and reports.

The template tests build the trainer exactly as `train()` does (`resolve_chat_template`
+ `build_trainer`) and read the labels TRL prepared; a tiny random Llama stands in for
the student there, since the labels do not depend on the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import trl
import yaml
from helpers import demo_config, step_settings
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from synthpert import cli
from synthpert.core.settings import Train
from synthpert.errors import CommandError
from synthpert.steps.train import (
    ASSISTANT_ONLY,
    COMPLETION_ONLY,
    build_trainer,
    loss_text,
    read_conversations,
    resolve_chat_template,
    resume_point,
    train,
)

REPO = Path(__file__).resolve().parents[1]
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
GENES = ["TP53", "MYC", "GATA1", "STAT3", "KLF1", "BRCA1", "EGFR", "JUN"]
ANSWERS = ["not differentially expressed", "downregulated", "upregulated"]
SYSTEM = "You are a molecular biologist."


def conversation(i: int, reasoning_words: int = 0) -> list[dict[str, str]]:
    pert, gene, label = GENES[i % 8], GENES[(i + 3) % 8], i % 3
    reasoning = f"{pert} regulates a pathway upstream of {gene}, so its expression shifts." + " More" * reasoning_words
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"In K562 cells, does knocking down {pert} change {gene}?"},
        {"role": "assistant", "content": f"<think>{reasoning}</think><answer>{ANSWERS[label]}</answer>"},
    ]


def write_sft(path: Path, conversations: list[list[dict]]) -> Path:
    rows = [
        {"tid": f"t{i}", "cell": "k562", "pert": GENES[i % 8], "gene": GENES[(i + 3) % 8], "label": i % 3, "messages": c}
        for i, c in enumerate(conversations)
    ]
    pl.DataFrame(rows).write_parquet(path)
    return path


def settings(model: str, **train_settings) -> Train:
    base = {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1}
    changes = {f"train.{key}": value for key, value in {**base, **train_settings}.items()}
    config = demo_config(**changes, **{"models.student": {"backend": "local", "model": model}})
    return step_settings("train", config)


def cli_settings(settings: Train) -> list[str]:
    """The two JSON arguments a rule passes."""
    return ["--settings", settings.params_json(), "--run", settings.run_json()]


def start_cli(data: Path, out: Path, config: Train, env: dict | None = None) -> subprocess.Popen:
    """`synthpert train` as a rule runs it, in a process group of its own (with its launcher's workers)."""
    command = [sys.executable, "-m", "synthpert", "train", "--data", str(data), "--out-dir", str(out)]
    return subprocess.Popen(
        [*command, *cli_settings(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-4000:]
    return stderr.decode()


def kill_after_a_checkpoint(proc: subprocess.Popen, out: Path, timeout: float) -> None:
    """SIGKILL the training's process group once a complete checkpoint is on disk."""
    try:
        deadline = time.monotonic() + timeout
        while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, f"training ended before a checkpoint was seen: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"no checkpoint within {timeout} s"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def tokenizer(embedded_model):
    return AutoTokenizer.from_pretrained(embedded_model)


def tiny_model(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def prepared_row(tokenizer, template, tmp_path) -> dict:
    """The first row as TRL prepared it for training, and the collated batch of it."""
    cfg = settings("x", batch_size=1, max_steps=1)
    trainer = build_trainer(tiny_model(tokenizer), tokenizer, [conversation(0)], cfg, template, tmp_path / "ckpt")
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    assert batch["labels"][0].tolist() == example["labels"]  # the collator keeps TRL's mask
    return example


def assert_loss_on_assistant_only(tokenizer, example):
    assistant = conversation(0)[-1]["content"]
    in_loss = loss_text(tokenizer, example)
    prompt = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == -100])
    assert assistant in in_loss  # the reasoning, verbatim, carries loss
    assert "<think>GATA1" not in prompt and "regulates a pathway" not in prompt
    assert SYSTEM in prompt and "does knocking down TP53 change STAT3" in prompt
    assert "molecular biologist" not in in_loss and "knocking down" not in in_loss


# ----------------------------------------------------------------- 1. the template trap


def test_embedded_template_trains_on_reasoning(tokenizer, tmp_path):
    template = resolve_chat_template(tokenizer)
    assert template.loss == COMPLETION_ONLY  # SmolLM2 has no generation markers: prompt/completion rows
    assert template.text == tokenizer.chat_template
    example = prepared_row(tokenizer, template, tmp_path)
    assert_loss_on_assistant_only(tokenizer, example)
    assert loss_text(tokenizer, example).endswith("<|im_end|>\n")  # the model learns to stop


def test_deepseek_template_is_switched_to_trl_training_variant(tokenizer, tmp_path):
    naive = (TRL_TEMPLATES / "deepseek_r1_distill.jinja").read_text()
    rendered = tokenizer.apply_chat_template(conversation(0), chat_template=naive, tokenize=False)
    assert "regulates a pathway" not in rendered  # the trap: the naive template drops the reasoning
    tokenizer.chat_template = naive
    template = resolve_chat_template(tokenizer)
    assert template.text == (TRL_TEMPLATES / "deepseek_r1_distill_training.jinja").read_text()
    assert template.loss == ASSISTANT_ONLY
    assert_loss_on_assistant_only(tokenizer, prepared_row(tokenizer, template, tmp_path))


def test_deepseek_training_template_from_file(tokenizer, tmp_path):
    template = resolve_chat_template(tokenizer, TRL_TEMPLATES / "deepseek_r1_distill_training.jinja")
    assert template.loss == ASSISTANT_ONLY
    assert_loss_on_assistant_only(tokenizer, prepared_row(tokenizer, template, tmp_path))


def test_templates_that_drop_reasoning_are_refused(tokenizer, tmp_path):
    with pytest.raises(CommandError, match="does not keep the assistant turn"):
        resolve_chat_template(tokenizer, TRL_TEMPLATES / "deepseek_r1_distill.jinja")
    # a variant TRL does not recognise cannot be switched: the probe refuses it
    tokenizer.chat_template = (TRL_TEMPLATES / "deepseek_r1_distill.jinja").read_text() + "\n"
    with pytest.raises(CommandError, match="train.chat_template"):
        resolve_chat_template(tokenizer)
    with pytest.raises(CommandError, match="does not exist"):
        resolve_chat_template(tokenizer, tmp_path / "missing.jinja")


# ----------------------------------------------------------------- 2. training


@pytest.mark.slow
def test_train_writes_adapter_log_and_metrics(embedded_model, tmp_path, monkeypatch):
    from peft import PeftModel

    work = tmp_path / "work"  # "embedded:" models live in resources/models of the working directory
    (work / "resources" / "models").mkdir(parents=True)
    (work / "resources" / "models" / embedded_model.name).symlink_to(embedded_model)
    monkeypatch.chdir(work)
    data = write_sft(tmp_path / "sft.parquet", [conversation(i) for i in range(8)])
    out = tmp_path / "out"
    args = ["train", "--data", str(data), "--out-dir", str(out)]
    assert cli.main([*args, *cli_settings(settings("embedded:smollm2-135m-instruct", save_steps=4))]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["adapter", "loss.png", "train_log.csv", "train_metrics.json"]
    log = pl.read_csv(out / "train_log.csv")
    assert log["step"].to_list() == [1, 2, 3, 4, 5, 6]  # logging_steps=1 honoured
    assert log["loss"][-1] < 0.7 * log["loss"][0]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["examples_trained"] == 8 and metrics["too_long"] == 0
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["final_loss"] == pytest.approx(log["loss"][-1])
    assert metrics["resumed_from_step"] is None

    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(embedded_model)
    model = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (lora_B starts at zero)
    saved = AutoTokenizer.from_pretrained(adapter)
    assert saved.chat_template == AutoTokenizer.from_pretrained(embedded_model).chat_template


# ----------------------------------------------------------------- 3. kill and resume


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(embedded_model, tmp_path, caplog):
    data = write_sft(tmp_path / "sft.parquet", [conversation(i) for i in range(8)])
    out = tmp_path / "out"
    config = settings(str(embedded_model), max_steps=6, save_steps=2)
    kill_after_a_checkpoint(start_cli(data, out, config), out, timeout=240)
    assert not (out / "train_metrics.json").exists()

    caplog.set_level("INFO", logger="synthpert.steps.train")
    metrics = train(data, config, out)
    assert metrics["resumed_from_step"] in (2, 4)
    assert metrics["steps"] == 6
    assert "resuming from" in caplog.text
    steps = pl.read_csv(out / "train_log.csv")["step"].to_list()
    assert steps == list(range(1, 7))  # the history of both sessions, no step twice
    assert not (out / "checkpoints").exists()


def test_resume_point_discards_other_runs_and_incomplete_checkpoints(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()  # empty, as the trainer makes it before the resume point is asked
    assert resume_point(ckpt, "run-a") is None
    assert "discarding" not in caplog.text  # a new run, not another run's checkpoints
    for step, complete in [(2, True), (4, True), (6, False)]:
        (ckpt / f"checkpoint-{step}").mkdir()
        if complete:
            (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resume_point(ckpt, "run-a") == ckpt / "checkpoint-4"
    assert not (ckpt / "checkpoint-6").exists()
    assert resume_point(ckpt, "run-b") is None  # other data or settings: start over
    assert not (ckpt / "checkpoint-4").exists()


# ----------------------------------------------------------------- 4. too long


@pytest.mark.slow
def test_too_long_conversations_are_dropped_and_counted(embedded_model, tmp_path, caplog):
    conversations = [conversation(i) for i in range(7)] + [conversation(7, reasoning_words=200)]
    data = write_sft(tmp_path / "sft.parquet", conversations)
    caplog.set_level("WARNING", logger="synthpert.steps.train")
    metrics = train(data, settings(str(embedded_model), max_steps=1, max_length=128), tmp_path / "out")
    assert metrics["too_long"] == 1 and metrics["examples"] == 8 and metrics["examples_trained"] == 7
    assert metrics["longest_tokens"] > 128
    assert "dropping 1 of 8 conversations longer than max_length 128" in caplog.text

    with pytest.raises(CommandError, match="every conversation .* longer than train.max_length 16"):
        train(data, settings(str(embedded_model), max_length=16), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------- settings and inputs


def test_settings_are_the_schema_train_section():
    schema = yaml.safe_load((REPO / "src" / "synthpert" / "core" / "schema.yaml").read_text())
    props = set(schema["properties"]["train"]["properties"])
    # variants: which jobs, not how; processes: the job's resources, not the configuration
    assert props - {"variants"} == {f for f in Train.__dataclass_fields__} - {"processes"}
    trained = settings("x", learning_rate=2e-4, save_steps=7, logging_steps=3, sharding="fsdp")
    assert trained.learning_rate == 2e-4 and trained.params()["learning_rate"] == 2e-4
    run = {"save_steps": 7, "logging_steps": 3, "sharding": "fsdp", "processes": 1, "model": trained.model.run()}
    assert trained.run() == run
    assert Train.from_cli(trained.params(), trained.run()) == trained
    with pytest.raises(CommandError, match="unknown .*'lr'"):
        Train.from_cli({**trained.params(), "lr": 1}, trained.run())


def test_bad_inputs_are_refused_before_loading(tmp_path):
    bad = write_sft(tmp_path / "bad.parquet", [conversation(0)[:2]])  # no assistant turn
    with pytest.raises(CommandError, match="row 0"):
        read_conversations(bad)
    good = write_sft(tmp_path / "good.parquet", [conversation(0)])
    local = settings("x")
    api = dataclasses.replace(local, model=dataclasses.replace(local.model, backend="openai"))
    with pytest.raises(CommandError, match="backend 'local'"):
        train(good, api, tmp_path / "o")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_without_cuda_is_refused(tmp_path):
    data = write_sft(tmp_path / "sft.parquet", [conversation(0)])
    with pytest.raises(CommandError, match="needs a CUDA GPU"):
        train(data, settings("no/such-model", load_in_4bit=True), tmp_path / "out")


def test_gpu_benchmark_runs_tiny_on_cpu(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_gpu", REPO / "benchmarks" / "bench_train_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = "--layers 1 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128 --vocab 512 --seq-len 32"
    assert bench.main([*tiny.split(), "--batch-size", "2", "--warmup-steps", "1", "--steps", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[padded] ") and "tokens/s" in line and "MFU" in line


# ----------------------------------------------------------------- 5. several processes
# Two gloo processes on the CPU (torchrun, as the step launches them): 2 steps of 2 short
# conversations, 1 per process; the reference is one process accumulating 2 batches of 1.
# Every process computes in one thread: on 2 shared cores, two threads per process spin
# against each other and the other process (a step took 85 s instead of 4 s under load).

MULTI = {"max_steps": 2, "batch_size": 1, "gradient_accumulation_steps": 2, "save_steps": 1, "max_length": 128}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what torchrun sets by default, whatever the caller's environment
ADAPTER_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # float sums in another order (all-reduce)


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys() and any("lora_B" in k for k in first)
    for key in first:
        torch.testing.assert_close(first[key], second[key], **ADAPTER_TOLERANCE, msg=key)
    assert any(t.abs().sum() > 0 for k, t in first.items() if "lora_B" in k)  # trained


@pytest.fixture(scope="module")
def multi_data(tmp_path_factory) -> Path:
    return write_sft(tmp_path_factory.mktemp("multi") / "sft.parquet", [conversation(i) for i in range(4)])


@pytest.fixture(scope="module")
def two_processes(embedded_model, multi_data) -> tuple[Train, Path, str]:
    """An uninterrupted 2-process run: its settings, output folder and log."""
    config = dataclasses.replace(settings(str(embedded_model), **MULTI), processes=2)
    out = multi_data.parent / "two"
    return config, out, finish(start_cli(multi_data, out, config, ONE_THREAD))


@contextlib.contextmanager
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_train_the_adapter_of_one_process_accumulating(two_processes, multi_data):
    config, out, stderr = two_processes
    assert "torchrun: 2 processes" in stderr
    assert "2 process(es) x batch 1 x accumulation 1 = 2 sequences per optimizer step" in stderr
    one = multi_data.parent / "one"
    with one_thread():
        metrics_one = train(multi_data, dataclasses.replace(config, processes=1), one)
    metrics = json.loads((out / "train_metrics.json").read_text())
    split = ("processes", "batch_per_process", "gradient_accumulation")
    assert [metrics_one[k] for k in split] == [1, 1, 2] and [metrics[k] for k in split] == [2, 1, 1]
    assert metrics["steps"] == 2
    assert_same_adapter(out, one)
    log, log_one = pl.read_csv(out / "train_log.csv"), pl.read_csv(one / "train_log.csv")
    assert log["step"].to_list() == [1, 2]  # written once, by rank 0
    assert log["loss"].to_list() == pytest.approx(log_one["loss"].to_list(), rel=1e-4)
    assert stderr.count("trained 2 steps") == 1  # rank 0 speaks for the group
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_adapter(two_processes, multi_data):
    config, uninterrupted, _ = two_processes
    out = multi_data.parent / "killed"
    # torchrun and both workers, once checkpoint-1 is complete (step 2 takes seconds)
    kill_after_a_checkpoint(start_cli(multi_data, out, config, ONE_THREAD), out, timeout=300)
    assert not (out / "train_metrics.json").exists()

    stderr = finish(start_cli(multi_data, out, config, ONE_THREAD))
    assert "resuming from" in stderr
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] == 2
    assert pl.read_csv(out / "train_log.csv")["step"].to_list() == [1, 2]
    assert_same_adapter(out, uninterrupted)
