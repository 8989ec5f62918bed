"""Real vLLM (its CPU build, 0.31.0) under the trainers, in the vLLM lane (`make test-engines`, `.venv-vllm`).

Colocate mode, as every GPU recipe runs it: CPPO, PAPO and GRPO (CPPO with λ = 0) train on tiny Qwen2.5-VL, Qwen2-VL
and Qwen3-VL, with the trainer's processor at a smaller pixel budget than the checkpoint's (so vLLM must be handed it).
TRL's own importance-sampling diagnostic, the gap between vLLM's sampling log-probs and the trainer's recomputed ones,
is the measurement: at float32 it is ~1e-7 when vLLM generated from exactly the processor's prompt, the same pixels and
the current weights, and ~1e-2 when any of the three is off. Also: LoRA, a repeated image after a weight sync (the
encoder cache), server mode (`trl vllm-serve`, generation only: TRL's weight sync there needs NCCL), and
`cppo-eval --backend vllm`.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image


pytest.importorskip("vllm", reason="the vLLM lane's venv (.venv-vllm, `make test-engines`) has vLLM")
pytestmark = pytest.mark.engines
sys.path.insert(0, str(Path(__file__).resolve().parent / "vllm_cpu"))

import cpu_build  # noqa: E402

from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer  # noqa: E402
from cppo_trl.core.images import load_processor  # noqa: E402
from cppo_trl.testing import build_tiny_vlm  # noqa: E402
from cppo_trl.trainer.vllm import VLLMFixes  # noqa: E402


BUDGET = {"min_pixels": 784, "max_pixels": 56 * 56 * 2}  # smaller than the tiny checkpoint's own 112x112 cap
SIZES = [(130, 100), (60, 90), (300, 200), (112, 112)]
FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
METHODS = {
    "cppo": (CPPOTrainer, CPPOConfig, {"cpl_weight": 1.0, "advantage_gating": False}),
    "papo": (PAPOTrainer, PAPOConfig, {"perception_loss_weight": 1.0}),
    "grpo": (CPPOTrainer, CPPOConfig, {"cpl_weight": 0.0}),
}
EXACT = 1e-5  # float32: vLLM and the trainer agree to rounding (a wrong prompt, grid or weight gives ~1e-2)


@pytest.fixture(scope="module", autouse=True)
def vllm_cpu():
    cpu_build.prepare()


def _image(seed: int, size) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _dataset(sizes=SIZES, seed=0) -> Dataset:
    content = [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
    rows = [
        {"prompt": [{"role": "user", "content": content}], "images": [_image(seed + i, s)]}
        for i, s in enumerate(sizes)
    ]
    return Dataset.from_list(rows)


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 5) for c in completions]


def _trainer(method, family, tmp_path, dataset=None, **overrides):
    trainer_cls, config_cls, extra = METHODS[method]
    model = build_tiny_vlm(family, tmp_path.parent / f"{family}-hd32", head_dim=32)
    args = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "beta": 0.0,
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_max_model_length": 1024,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        **extra,
        **overrides,
    }
    peft = args.pop("peft_config", None)
    return trainer_cls(
        model=str(model),
        reward_funcs=length_reward,
        args=config_cls(**args),
        train_dataset=dataset if dataset is not None else _dataset(),
        processing_class=load_processor(str(model), **BUDGET),
        peft_config=peft,
    )


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_colocate_generates_from_the_processors_prompt(family, method, tmp_path):
    trainer = _trainer(method, family, tmp_path)
    trainer.train()
    prefix = trainer._metric_prefix
    assert _history(trainer, f"{prefix}/vllm_prompts_checked") == [4.0, 4.0]  # every prompt's ids were the processor's
    gaps = _history(trainer, "sampling/sampling_logp_difference/max")
    assert len(gaps) == 2 and max(gaps) < EXACT, gaps  # step 2 follows a weight sync: the new weights reached vLLM
    assert trainer._vllm_fixes.encoder_resets >= 1


def test_lora_in_colocate_mode(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer("cppo", "qwen2_5_vl", tmp_path, peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert max(_history(trainer, "sampling/sampling_logp_difference/max")) < EXACT
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


@pytest.mark.parametrize("reset", [True, False])
def test_a_repeated_image_after_a_sync_uses_the_new_vision_tower(reset, tmp_path, monkeypatch):
    """Two prompts over three steps: step 3 shows step 1's image again, after two weight syncs. With the encoder
    cache reset vLLM embeds it with the current vision tower; without it, with the stale embeddings of step 1."""
    if not reset:
        monkeypatch.setattr(VLLMFixes, "reset_encoder_cache", lambda self: None)
    dataset = _dataset(sizes=[(130, 100), (60, 90)])
    trainer = _trainer(
        "grpo", "qwen2_5_vl", tmp_path, dataset=dataset, per_device_train_batch_size=2, max_steps=3, learning_rate=0.1
    )
    trainer.args.shuffle_dataset = False
    trainer.train()
    gaps = _history(trainer, "sampling/sampling_logp_difference/max")
    assert len(gaps) == 3 and max(gaps[:2]) < EXACT
    assert (gaps[2] < EXACT) if reset else (gaps[2] > 1e-3), gaps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`trl vllm-serve` on 127.0.0.1 with the tiny Qwen2.5-VL at the trainer's pixel budget."""
    model = build_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("served") / "qwen2_5_vl-hd32", head_dim=32)
    port = _free_port()
    limits = json.dumps({"size": {"shortest_edge": BUDGET["min_pixels"], "longest_edge": BUDGET["max_pixels"]}})
    command = [str(Path(sys.executable).with_name("trl")), "vllm-serve", "--model", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--enforce_eager", "true", "--max_model_len", "1024"]
    command += ["--mm-processor-kwargs", limits]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-4000:]
                time.sleep(2)
        else:
            pytest.fail("trl vllm-serve did not start in 240 s:\n" + log.read_text()[-4000:])
        yield model, port
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def _server_trainer(model, port, tmp_path, monkeypatch, processor_budget):
    from trl.generation.vllm_client import VLLMClient

    # TRL's weight sync in server mode runs on vLLM's NCCL weight-transfer engine, which needs CUDA: generation only.
    monkeypatch.setattr(VLLMClient, "init_communicator", lambda self, device=None: None)
    monkeypatch.setattr(VLLMClient, "update_named_params", lambda self, *args, **kwargs: None)
    config = CPPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=1,
        beta=0.0,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=port,
        vllm_importance_sampling_correction=False,  # weights are not synced here
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    processing = load_processor(str(model), **processor_budget)
    return CPPOTrainer(
        model=str(model),
        reward_funcs=length_reward,
        args=config,
        train_dataset=_dataset(),
        processing_class=processing,
    )


def test_server_mode_generates_from_the_processors_prompt(vllm_server, tmp_path, monkeypatch):
    model, port = vllm_server
    trainer = _server_trainer(model, port, tmp_path, monkeypatch, BUDGET)
    trainer.train()
    assert _history(trainer, "cppo/vllm_prompts_checked") == [4.0]
    assert trainer._vllm_fixes.encoder_resets == 1  # the server's encoder cache is reset after the (stubbed) sync


def test_server_mode_refuses_a_server_at_another_pixel_budget(vllm_server, tmp_path, monkeypatch):
    model, port = vllm_server
    trainer = _server_trainer(model, port, tmp_path, monkeypatch, {"min_pixels": 784, "max_pixels": 112 * 112})
    with pytest.raises(ValueError, match="mm-processor-kwargs"):
        trainer.train()


def test_cppo_eval_with_the_vllm_backend(tmp_path):
    from cppo_trl.evaluate import cli

    model = build_tiny_vlm("qwen2_5_vl", tmp_path / "qwen2_5_vl-hd32", head_dim=32)
    argv = ["--model_name_or_path", str(model), "--benchmarks", "synthetic", "--backend", "vllm", "--use_cpu", "true"]
    argv += ["--num_samples", "2", "--max_new_tokens", "4", "--max_samples", "4", "--dtype", "float32"]
    argv += ["--output_dir", str(tmp_path / "eval"), "--max_model_len", "1024"]
    cli.main(argv)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    synthetic = results["benchmarks"]["synthetic"]
    assert synthetic["n"] == 4 and len(synthetic["per_draw"]) == 2 and 0 <= synthetic["accuracy"] <= 1
