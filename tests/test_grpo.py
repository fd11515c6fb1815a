"""`synthpert grpo`: prompts from the tuples the traces left, asked as the evaluation asks them;
a GRPO run that writes its curves, resumes from a checkpoint and keeps only its own adapter.
A tiny random Llama with the embedded tokenizer stands in for the student."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest
from helpers import demo_config, step_settings
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, TrainerCallback

from synthpert.core.labels import DOWN, NOT_DE, UP
from synthpert.core.prompts import user_query
from synthpert.core.settings import Generation, Grpo, Sample
from synthpert.errors import CommandError, ConfigError
from synthpert.steps import grpo as grpo_step
from synthpert.steps.grpo import draw_prompts, grpo, prompt_texts

GENES = [f"G{i}" for i in range(30)]


def split_table() -> pl.DataFrame:
    """30 train tuples (20 not DE, 5 down, 5 up) and 6 test tuples of K562."""
    rows = []
    for i, gene in enumerate(GENES):
        label = NOT_DE if i < 20 else DOWN if i < 25 else UP
        rows.append({"cell": "k562", "pert": "P1", "gene": gene, "label": label, "role": "train"})
    rows += [{"cell": "k562", "pert": "P2", "gene": g, "label": i % 3, "role": "test"} for i, g in enumerate(GENES[:6])]
    frame = pl.DataFrame(rows, schema_overrides={"label": pl.Int8})
    return frame.with_columns(de=(pl.col("label") != NOT_DE).cast(pl.Int8))


TRACED = pl.DataFrame({"cell": ["k562"] * 3, "pert": ["P1"] * 3, "gene": ["G0", "G20", "G25"]})


def test_prompts_leave_out_traced_and_test_tuples_and_balance_the_classes():
    drawn = draw_prompts(split_table(), TRACED, Sample(None, 9, 88, True))
    assert drawn.group_by("label").len().sort("label")["len"].to_list() == [3, 3, 3]
    assert set(drawn["pert"]) == {"P1"}  # train role only
    assert not set(drawn["gene"]) & {"G0", "G20", "G25"}
    assert drawn.equals(draw_prompts(split_table().reverse(), TRACED, Sample(None, 9, 88, True)))  # data + seed only
    uniform = draw_prompts(split_table(), TRACED, Sample(None, 9, 88, False))
    assert uniform.height == 9 and (uniform["label"] == NOT_DE).sum() > 3  # the natural mix, mostly "not DE"
    with pytest.raises(CommandError, match="no training tuple is left"):
        draw_prompts(split_table().filter(pl.col("gene") == "G0"), TRACED, Sample(None, 9, 88, True))


def test_prompts_are_the_evaluations_local_prompt(embedded_model):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    rows = draw_prompts(split_table(), TRACED, Sample(None, 3, 88, True))
    texts, prefill = prompt_texts(tokenizer, rows, Generation(32, 1.0, 1.0, None))
    assert prefill == "<think>\n"
    first = rows.row(0, named=True)
    assert user_query("k562", first["pert"], first["gene"]) in texts[0]
    assert texts[0].endswith("<|im_start|>assistant\n<think>\n")


@pytest.fixture(scope="module")
def student(tmp_path_factory, embedded_model):
    """A tiny random student folder (embedded tokenizer) and an SFT adapter of it."""
    root = tmp_path_factory.mktemp("student")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    split = root / "split.parquet"
    split_table().write_parquet(split)
    traced = root / "sample.parquet"
    TRACED.write_parquet(traced)
    return root


def settings(student, rl_row="synthpert_grpo", **rl) -> Grpo:
    base = {"max_steps": 2, "num_generations": 2, "batch_size": 4, "max_completion_length": 8, "save_steps": 1}
    config = demo_config(
        **{f"rl.{k}": v for k, v in {**base, **rl}.items()},
        **{"models.student": {"backend": "local", "model": str(student / "base")}},
    )
    return step_settings("grpo", config, rl_row=rl_row)


class StopAfter(TrainerCallback):
    """Kills the run (as a pre-emption would) once checkpoint `step` is saved."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_the_evidence_row_prompts_with_each_tuples_block(student, tmp_path, monkeypatch):
    """synthpert_grpo_evidence: the same draw, each prompt the evaluation's evidence prompt."""
    seen = {}

    def capture(model, tokenizer, dataset, *args, **kwargs):
        seen["prompts"] = dataset["prompt"]
        raise KeyboardInterrupt  # the prompts are what this test reads: no training

    monkeypatch.setattr(grpo_step, "build_trainer", capture)
    for row in ("synthpert_grpo", "synthpert_grpo_evidence"):
        with pytest.raises(KeyboardInterrupt):
            grpo(student / "split.parquet", student / "sample.parquet", student / "adapter",
                 settings(student, rl_row=row), tmp_path / row)  # fmt: skip
        seen[row] = seen.pop("prompts")
    plain, shown = seen["synthpert_grpo"], seen["synthpert_grpo_evidence"]
    assert len(plain) == len(shown) == 6
    drawn = draw_prompts(split_table(), TRACED, settings(student).sample)
    for before, after, gene in zip(plain, shown, drawn["gene"], strict=True):
        query = user_query("k562", "P1", gene)
        block = f"{query}\n\nEvidence from the training data:\n- {gene} in K562: no training knockdown measured it."
        assert query in before and "Evidence" not in before
        assert block in after  # P1 is the only perturbation: its own row is never in its block
        assert after.endswith("<|im_start|>assistant\n<think>\n")


@pytest.mark.slow
def test_grpo_writes_curves_resumes_and_keeps_its_own_adapter(student, tmp_path, monkeypatch, caplog):
    cfg = settings(student, max_steps=3, beta=0.04)
    out = tmp_path / "out"
    args = (student / "split.parquet", student / "sample.parquet", student / "adapter", cfg, out)
    build = grpo_step.build_trainer

    def killed_at_2(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(StopAfter(2))
        return trainer

    monkeypatch.setattr(grpo_step, "build_trainer", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        grpo(*args)
    assert not (out / "grpo_metrics.json").exists()
    monkeypatch.setattr(grpo_step, "build_trainer", build)

    caplog.set_level("INFO", logger="synthpert.steps.grpo")
    metrics = grpo(*args)
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 3
    assert "resuming from" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "grpo_log.csv", "grpo_metrics.json", "kl.png", "reward.png"]
    log = pl.read_csv(out / "grpo_log.csv")
    assert log["step"].to_list() == [1, 2, 3]  # both sessions, no step twice
    assert log["kl"].is_not_null().all() and log["reward"].is_not_null().all()
    assert json.loads((out / "grpo_metrics.json").read_text())["prompts_by_class"] == {"not_de": 2, "down": 2, "up": 2}
    assert metrics["not_de_share"] == pytest.approx(1 / 3)  # the demo's 6 prompts, balanced
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "ref").exists()
    assert not (out / "checkpoints").exists()


def test_bad_settings_and_inputs_are_refused_before_loading(student, tmp_path):
    args = (student / "split.parquet", student / "sample.parquet")
    with pytest.raises(CommandError, match="multiple of rl.num_generations"):
        grpo(*args, student / "adapter", dataclasses.replace(settings(student), batch_size=5), tmp_path / "out")
    with pytest.raises(CommandError, match="not a PEFT adapter"):
        grpo(*args, tmp_path, settings(student), tmp_path / "out")


def test_settings_and_config_checks():
    cfg = step_settings("grpo")
    assert isinstance(cfg, Grpo)
    # intervals, the generation server and the process count never re-run GRPO
    assert set(cfg.run()) == {"model", "save_steps", "logging_steps", "vllm_mode", "processes"}
    assert cfg.params()["sample"] == {"fraction": None, "count": 6, "seed": 88, "balanced": True}
    same = step_settings("grpo", demo_config(**{"rl.save_steps": 7, "rl.logging_steps": 3, "rl.vllm_mode": "server"}))
    assert same.params_json() == cfg.params_json()  # a rule's params: no re-run
    for key, value in [("rl.learning_rate", 1e-3), ("rl.beta", 0.0), ("rl.sample.seed", 1), ("rl.format_weight", 0.5)]:
        assert step_settings("grpo", demo_config(**{key: value})).params_json() != cfg.params_json(), key
    with pytest.raises(ConfigError, match="add \\['synthpert'\\] to train.variants"):
        demo_config(**{"train.variants": ["sft_data"], "evaluate.rows": ["base", "synthpert_grpo"]})
    with pytest.raises(ConfigError, match="multiple of rl.num_generations"):
        demo_config(**{"rl.batch_size": 5})
