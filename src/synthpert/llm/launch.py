"""Several training processes for `train` and `grpo`, through the launchers TRL is built on.

A training step is one command (`synthpert train ...`). When its job holds more than one
process, the command starts itself again as the workers of a launcher and waits for them:

* `torchrun` (`torch.distributed.run --standalone`, the engine under `accelerate launch`)
  on one machine, with the process count of the job's resources (`processes`, a run
  setting: see `core.settings.job_processes`);
* `srun` in the batch script of a SLURM job of several tasks (a job with the `mpi` resource
  and `tasks` or `nodes` x `tasks_per_node`: docs/cluster.md), one task per process, on one
  node or many; the workers meet through torch's `env://` rendezvous at the first node.
  Snakemake's job-step executor strips the allocation's `SLURM_*` variables before it runs
  the command, so its tasks, nodes and CPUs per task are read from `scontrol show job`.

Each worker runs the same step; transformers' `Trainer` (through accelerate) sees `RANK`,
`WORLD_SIZE` and `LOCAL_RANK`, joins the process group (NCCL on GPUs, gloo on CPUs) and
trains data parallel (or sharded, `train.sharding`). One process is the plain command,
untouched: no launcher, no process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

from synthpert.errors import CommandError

log = logging.getLogger(__name__)

WORKER = "SYNTHPERT_WORKER"  # set for the workers: they train and never launch again
VLLM_SERVER = "SYNTHPERT_VLLM_SERVER"  # host:port of the job's `trl vllm-serve` (GRPO, rl.vllm_mode server)
PR_SET_PDEATHSIG = 1  # prctl(2)
SERVER_START_S = 1200  # a large student's engine takes minutes to load and compile


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a step runs: `launcher` is `none` (this process trains alone), `worker` (this
    process is one of a launched group), `torchrun` or `srun` (start the group)."""

    launcher: str
    processes: int
    nodes: int = 1
    cpus_per_task: int | None = None


def plan(processes: int, env: Mapping[str, str] = os.environ, allocation=None) -> Launch:
    """The launch of a step asked to run in `processes` processes: in a SLURM job's batch
    script (a job id, no job step), srun with the allocation's tasks; inside a job step
    (`srun -n1`) or outside SLURM, torchrun; one process, nothing. `allocation(job_id)`
    reads the job's tasks, nodes and CPUs per task (default: `slurm_allocation`)."""
    if processes < 1:
        raise CommandError(f"a training step needs at least one process, got {processes}")
    if env.get(WORKER):
        return Launch("worker", int(env.get("WORLD_SIZE", 1)))
    if processes == 1:
        return Launch("none", 1)
    if env.get("SLURM_JOB_ID") and not env.get("SLURM_STEP_ID"):
        job = (allocation or slurm_allocation)(env["SLURM_JOB_ID"])
        tasks = job.get("NumTasks", processes)
        if tasks != processes:
            log.warning("the SLURM job has %d tasks: training in %d processes, not %d", tasks, tasks, processes)
        return Launch("srun", tasks, job.get("NumNodes", 1), job.get("CPUs/Task"))
    return Launch("torchrun", processes)


def slurm_allocation(job_id: str) -> dict[str, int]:
    """NumTasks, NumNodes and CPUs/Task of a SLURM job (`scontrol show job`); {} if unknown."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
    return {k: int(fields[k]) for k in ("NumTasks", "NumNodes", "CPUs/Task") if fields.get(k, "").isdigit()}


def command(launch: Launch, step_argv: list[str]) -> list[str]:
    """The command line that starts the workers of `launch`, each running `synthpert <step_argv>`."""
    step = [sys.executable, "-m", "synthpert", *step_argv]
    if launch.launcher == "torchrun":
        # "--": torchrun's parser must not read the step's options (it takes `--run` for its `--run-path`)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch.processes}",
                "-m", "--", "synthpert", *step_argv]  # fmt: skip
    if launch.launcher == "srun":
        cpus = [f"--cpus-per-task={launch.cpus_per_task}"] if launch.cpus_per_task else []
        return ["srun", "--kill-on-bad-exit=1", f"--ntasks={launch.processes}", *cpus, *step]
    raise ValueError(f"no command starts workers for launcher {launch.launcher!r}")


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """What torch's `env://` rendezvous reads, for a task started by srun (torchrun sets it
    itself): rank, world size and local rank from SLURM's task variables."""
    if env.get(WORKER) != "srun" or "RANK" in env:
        return {}
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(_tasks_on_this_node(env)),
    }


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    # SLURM_STEP_TASKS_PER_NODE reads like "2(x3),1": this node's count is the NODEID-th
    counts = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS", "1")).split(","):
        count, _, times = part.partition("(x")
        counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return counts[min(int(env.get("SLURM_NODEID", 0)), len(counts) - 1)]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """On Linux, this process receives `sig` when its parent dies, however it dies (SIGKILL
    included): torchrun starts each worker in a session of its own, so a killed job would
    otherwise leave its workers training and writing beside the run that resumes it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


def world_size() -> int:
    """Processes training together: the launcher's WORLD_SIZE, 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_step(step_argv: list[str], processes: int, extra_env: Mapping[str, str] | None = None) -> bool:
    """Start `synthpert <step_argv>` in its workers when the job holds several processes.

    Returns True when the workers ran (the caller has nothing left to do), False when this
    process trains itself: one process (today's single-process path), or a worker (its
    rank's environment is completed here, before anything initialises torch.distributed).
    A worker other than rank 0 logs warnings only: rank 0 speaks for the group.
    """
    launch = plan(processes)
    if launch.launcher == "worker":
        die_with_parent()
        os.environ.update(worker_environment(os.environ))
        if int(os.environ.get("RANK", 0)) != 0:
            logging.getLogger("synthpert").setLevel(logging.WARNING)
        return False
    if launch.launcher == "none":
        return False
    env = {**os.environ, **(extra_env or {}), WORKER: launch.launcher}
    if launch.launcher == "srun":
        env.setdefault("MASTER_ADDR", socket.gethostname())  # the batch host is the first node: task 0 runs there
        env.setdefault("MASTER_PORT", str(free_port()))
    argv = command(launch, step_argv)
    log.info("%s: %d processes on %d node(s): %s", launch.launcher, launch.processes, launch.nodes, " ".join(argv))
    # the launcher stops its workers on SIGTERM; it gets one if this process dies
    done = subprocess.run(argv, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    if done.returncode != 0:
        raise CommandError(
            f"{launch.launcher} training processes ({launch.processes}) failed with exit code {done.returncode}; "
            "their errors are above"
        )
    return True


def visible_gpus() -> list[str]:
    """The GPUs this job may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    return [g for g in listed.split(",") if g]


@contextlib.contextmanager
def vllm_server(model: str, gpus: int):
    """TRL's generation server (`trl vllm-serve`) for GRPO on the last of the job's `gpus`
    GPUs, for as long as the training runs; yields the environment of the training
    processes (the other GPUs, and where the server listens). One node only."""
    visible = visible_gpus()
    if gpus < 2 or len(visible) < gpus:
        raise CommandError(
            f"rl.vllm_mode server needs at least 2 GPUs in the job (one generates, the others train); "
            f"the job holds {gpus} and sees {len(visible)}"
        )
    if plan(gpus - 1).launcher == "srun":
        raise CommandError("rl.vllm_mode server runs on one node; use a job of one task (docs/grpo.md)")
    port = free_port()
    argv = ["trl", "vllm-serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    log.info("vLLM server on GPU %s: %s", visible[gpus - 1], " ".join(argv))
    server = subprocess.Popen(argv, env={**os.environ, "CUDA_VISIBLE_DEVICES": visible[gpus - 1]})
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/", timeout=5):
                    break
            except OSError:
                if server.poll() is not None:
                    code = server.returncode
                    raise CommandError(f"trl vllm-serve exited with code {code} before it was ready") from None
                if time.monotonic() > deadline:
                    raise CommandError(f"trl vllm-serve was not ready within {SERVER_START_S} s") from None
                time.sleep(5)
        yield {"CUDA_VISIBLE_DEVICES": ",".join(visible[: gpus - 1]), VLLM_SERVER: f"127.0.0.1:{port}"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
