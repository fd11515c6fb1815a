"""Configurations and step settings for tests, built the way the workflow builds them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

from synthpert.core import config as cfg
from synthpert.core import settings

REPO = Path(__file__).resolve().parents[1]


def change(config: dict, **changes) -> dict:
    """A copy of `config` with dotted keys set (`**{"train.learning_rate": 1e-3}`)."""
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config


def demo_config(**changes) -> dict:
    """config/demo.yaml with `changes`, validated and completed with the schema's defaults."""
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    return cfg.complete(change(raw, **changes))


def model(**entry) -> settings.Model:
    """The settings of a `models:` entry written in a test (`backend`, `model`, ...),
    completed with the schema's defaults (`engine={...}` for vLLM's engine settings)."""
    return settings.Model.of(cfg.model_entry(entry))


def step_settings(step: str, config: dict | None = None, **wildcards) -> settings.Settings:
    """The typed settings a rule passes to `step`, from `config` (default: the demo's)."""
    return settings.for_step(config if config is not None else demo_config(), step, **wildcards)


def random_adapter(model, folder):
    """A LoRA adapter with non-zero weights (a fresh one would answer as the base model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


LOAD_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

snakefile, configfile, workdir = map(Path, sys.argv[1:])
with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(
        resource_settings=ResourceSettings(),
        config_settings=ConfigSettings(configfiles=[configfile]),
        storage_settings=StorageSettings(),
        snakefile=snakefile,
        workdir=workdir,
    )._workflow
    rules = {
        r.name: {
            "conda": r.conda_env and str((Path(r.snakefile).parent / r.conda_env).resolve()),
            "shell": r.shellcmd,
            "output": [str(f) for f in r.output],
        }
        for r in workflow.rules
        if not r.norun
    }
print(json.dumps(rules))
"""


def load_rules(configfile: Path, workdir: Path) -> dict[str, dict]:
    """Each rule of the workflow under `configfile`: its conda file, shell command (as
    Snakemake compares it for re-runs) and outputs, as declared."""
    args = [str(REPO / "Snakefile"), str(configfile), str(workdir)]
    done = subprocess.run([sys.executable, "-c", LOAD_RULES, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
