"""Several training processes (`llm/launch.py`, `llm/training.py`): how many a job holds, how
they are started, and how the batch is split so that an optimizer step sees the same
sequences. The training itself with two processes is in test_train.py."""

from __future__ import annotations

import sys

import pytest
from helpers import demo_config, step_settings

from synthpert.core.settings import for_step, job_processes
from synthpert.errors import CommandError, ConfigError
from synthpert.llm.launch import WORKER, Launch, command, plan, worker_environment
from synthpert.llm.training import distributed_arguments, process_batches


def test_processes_come_from_the_jobs_resources_and_never_rerun_a_job():
    assert job_processes(None) == job_processes({"gpu": 1}) == 1
    assert job_processes({"gpu": 4}) == 4
    assert job_processes({"gpu": 1, "tasks": 2}) == 2  # CPU processes: SLURM's tasks
    assert job_processes({"nodes": 2, "tasks_per_node": 4, "gpu": 4}) == 8
    with pytest.raises(ConfigError, match="positive integer"):
        job_processes({"tasks": "two"})
    for step in ("train", "grpo"):
        one, two = step_settings(step), for_step(demo_config(), step, resources={"tasks": 2})
        assert (one.run()["processes"], two.run()["processes"]) == (1, 2)
        assert one.params_json() == two.params_json()  # a rule's params: no re-run


def test_the_effective_batch_is_kept_whatever_the_process_count():
    assert process_batches(4, 1, 1, "train") == (4, 1)  # one process: the settings as they are
    assert process_batches(1, 2, 2, "train") == (1, 1)  # accumulation gives way first
    assert process_batches(4, 4, 2, "train") == (4, 2)
    assert process_batches(4, 1, 2, "train") == (2, 1)  # then the per-process batch
    assert process_batches(16, 4, 8, "rl") == (8, 1)
    with pytest.raises(CommandError, match="train.batch_size 3 x train.gradient_accumulation_steps 1 = 3"):
        process_batches(3, 1, 2, "train")


def test_launch_plans_and_commands():
    assert plan(1, {}) == Launch("none", 1)
    assert plan(2, {}) == Launch("torchrun", 2)
    assert plan(2, {WORKER: "torchrun", "WORLD_SIZE": "2"}).launcher == "worker"
    job = {"NumTasks": 8, "NumNodes": 2, "CPUs/Task": 8}  # what scontrol says of the job
    batch = {"SLURM_JOB_ID": "7"}  # Snakemake's job step leaves the batch script little more
    assert plan(8, batch, allocation=lambda _: job) == Launch("srun", 8, 2, 8)
    assert plan(1, batch, allocation=lambda _: job) == Launch("none", 1)
    assert plan(2, {**batch, "SLURM_STEP_ID": "0"}) == Launch("torchrun", 2)  # inside `srun -n1`: torchrun
    with pytest.raises(CommandError, match="at least one process"):
        plan(0, {})

    step = ["train", "--data", "d.parquet"]
    assert command(Launch("torchrun", 2), step) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "--", "synthpert", *step
    ]  # fmt: skip
    assert command(Launch("srun", 8, 2, 8), step) == [
        "srun", "--kill-on-bad-exit=1", "--ntasks=8", "--cpus-per-task=8", sys.executable, "-m", "synthpert", *step
    ]  # fmt: skip


def test_an_srun_task_finds_its_rank():
    task = {WORKER: "srun", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}  # fmt: skip
    assert worker_environment(task) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert worker_environment({**task, WORKER: "torchrun"}) == {}  # torchrun sets them itself


def test_distributed_trainer_arguments():
    assert distributed_arguments(1) == {} == distributed_arguments(1, "fsdp")  # one process: today's arguments
    ddp = distributed_arguments(2)
    assert ddp["ddp_find_unused_parameters"] is False and "fsdp" not in ddp
    assert distributed_arguments(2, "fsdp")["fsdp"] == "full_shard auto_wrap"
    with pytest.raises(CommandError, match="sharding"):
        distributed_arguments(2, "zero3")
