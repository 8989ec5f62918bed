"""Launch a script on 2 CPU processes the way a GPU user launches on 8, under DDP or DeepSpeed, and never hang.

- `ddp`: `accelerate launch --multi_gpu --num_processes 2` with the script's `use_cpu=True`: accelerate's MULTI_CPU
  mode, torch DDP over gloo, buffers broadcast at every forward (DDP's default).
- `zero2` / `zero3`: `accelerate launch` with a DEEPSPEED config (DeepSpeed's CPU accelerator, gloo), the script's
  `use_cpu=False, ddp_backend="gloo"`; ZeRO-3 with `stage3_param_persistence_threshold: 0`, so that even tiny
  parameters are sharded as a 7B model's are (the recipes' zero3.yaml leaves small ones whole).

FSDP cannot run here: accelerate 1.15 switches to FSDP only from a GPU-like distributed type, so on CPU an FSDP config
silently becomes DDP. FSDP shares DeepSpeed ZeRO-3's code path on the rails (`is_fsdp_enabled` wherever
`is_deepspeed_enabled` matters), which is how it stays correct.

Every job runs in its own session with a marker in its environment; on timeout every process carrying the marker is
killed (torchrun starts each rank in a new session, so killing the launcher's group alone would orphan them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
MODES = ("ddp", "zero2", "zero3")


@dataclass
class Job:
    returncode: int
    output: str
    seconds: float
    timed_out: bool


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    auto = dict.fromkeys(
        ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"),
        "auto",
    )
    return {"zero_optimization": zero, **auto, "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(mode: str, scratch: Path, port: int) -> list[str]:
    common = ["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port)]
    if mode == "ddp":
        return [ACCELERATE, "launch", "--multi_gpu", *common, "--mixed_precision", "no", "--dynamo_backend", "no"]
    stage = int(mode[-1])
    ds_file = scratch / f"ds_zero{stage}.json"
    ds_file.write_text(json.dumps(deepspeed_config(stage)))
    config = scratch / f"accelerate_zero{stage}.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        f"use_cpu: false\ndeepspeed_config:\n  deepspeed_config_file: {ds_file}\n"
        f"  zero3_init_flag: {'true' if stage == 3 else 'false'}\n"
    )
    return [ACCELERATE, "launch", "--config_file", str(config), *common[4:]]


def _kill_marked(marker: str) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"CPPO_TEST_JOB={marker}".encode() in environ.split(b"\0"):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def launch(mode: str, script: Path, args: list[str], scratch: Path, timeout: float, device: str = "cpu") -> Job:
    """Run `script args` on 2 processes under `mode`; a job past `timeout` seconds is killed, whole. `device` "cuda"
    runs on 2 GPUs instead (`make gpu-check`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scratch.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    marker = uuid.uuid4().hex
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(CPPO_TEST_JOB=marker, CPPO_RANK_TIMEOUT=str(max(30, int(timeout) - 30)))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        if mode != "ddp":
            env["DS_ACCELERATOR"] = "cpu"
    command = [*_command(mode, scratch, port), str(script), *args]
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_marked(marker)
        output, _ = process.communicate()
        timed_out = True
    finally:
        _kill_marked(marker)
    return Job(process.returncode, output, time.monotonic() - start, timed_out)
