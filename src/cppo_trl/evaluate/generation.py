"""The two generation backends of `cppo-eval`, the model loading they share, and per-sample seeded sampling.

- `TransformersBackend`: batched `generate` with `num_return_sequences=k` (never one prompt at a time).
- `VLLMBackend` (`--backend vllm`): one request per prompt with `SamplingParams(n=k)`, tensor parallel on one node;
  `vllm` is imported only when this backend is built.

Both receive images in RGB (`cppo_trl.core.images.to_rgb`) and resize them with the recipe's pixel budget: the
processor is loaded with its `min_pixels`/`max_pixels`, which vLLM also gets as `mm_processor_kwargs`, so every image
reaches the model at the training resolution.

Reproducibility: the k draws of a sample depend only on (seed, sample key), never on which other samples share its
batch or process. vLLM gets a per-request seed; for transformers, `PerSampleSampler` draws each row's token by the
Gumbel-max trick with that row's own generator — an exact sample from the temperature / top-k / top-p distribution —
so an interrupted-then-resumed or data-parallel run draws what an uninterrupted single-process run draws.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from cppo_trl.core.images import load_processor


logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; the defaults are the paper's protocol (accuracy@8 at temperature 1.0, top-p 1, top-k off)."""

    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 2048
    seed: int = 42

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.temperature == 0 and self.num_samples != 1:
            raise ValueError(
                f"temperature 0 is greedy decoding: all {self.num_samples} draws would be identical; "
                "use --num_samples 1 --temperature 0 for greedy pass@1"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Prompt:
    """One sample to generate for: its seed key, chat messages (image parts in place) and prepared images."""

    key: str
    messages: list[dict[str, Any]]
    images: list[PIL.Image.Image]


def sample_seed(seed: int, key: str, draw: int = 0) -> int:
    """63-bit seed of draw `draw` of the sample `key` (sha256: identical in every process and on resumption)."""
    digest = hashlib.sha256(f"cppo-eval\0{seed}\0{draw}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf what top-k (0 = off) and then nucleus top-p (1 = off) exclude; the best token always stays."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before a token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def gumbel_choice(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """argmax(logits + Gumbel noise): an exact draw from softmax(logits), with the noise made from `uniform` [0, 1)."""
    tiny = torch.finfo(uniform.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=-1)


class PerSampleSampler(LogitsProcessor):
    """Draws every row's next token with its own generator and returns logits that allow only that token.

    Relies on transformers 5 `generate`: custom logits processors run before the sampling warpers (none are built at
    temperature 1, top-k 0, top-p 1), and `do_sample` then picks the single finite token; rows are prompt-major
    (`num_return_sequences` repeats each prompt k times in a row).
    """

    def __init__(self, seeds: Sequence[int], sampling: SamplingConfig, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.sampling = sampling

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.size(0) != len(self.generators):
            raise RuntimeError(f"{scores.size(0)} rows to sample but {len(self.generators)} seeded generators")
        logits = filter_logits(scores.float() / self.sampling.temperature, self.sampling.top_k, self.sampling.top_p)
        uniform = torch.stack(
            [torch.rand(scores.size(-1), generator=g, device=scores.device) for g in self.generators]
        )  # (rows, vocab)
        choice = gumbel_choice(logits, uniform)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter(-1, choice.unsqueeze(-1), 0.0)


# --- model loading ------------------------------------------------------------------------------------------------


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (`./x`, `/x`, `~/x`, `a/b/c`) can only be a local path."""
    return _HUB_ID.match(name) is None


def resolve_model(model_name_or_path: str, tiny_family: str = "qwen2_5_vl") -> tuple[str, str | None]:
    """(model to load, LoRA adapter folder or None). A missing local path fails here, naming it."""
    from cppo_trl.testing import TINY_PREFIX, resolve_model_path

    if not model_name_or_path:
        raise ValueError("model_name_or_path is required (a checkpoint folder, a Hub id or a LoRA adapter folder)")
    if model_name_or_path == "tiny" or model_name_or_path.startswith(TINY_PREFIX):
        return resolve_model_path(model_name_or_path, tiny_family), None
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model path {path} is a file; pass the checkpoint folder")
        adapter_config = path / "adapter_config.json"
        if adapter_config.is_file():
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{adapter_config} names no base_model_name_or_path")
            return base, str(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has neither config.json nor adapter_config.json")
        return str(path), None
    if _looks_like_path(model_name_or_path):
        raise FileNotFoundError(f"model path {model_name_or_path} does not exist")
    return model_name_or_path, None  # a Hub id


def model_fingerprint(path: str | None) -> str | None:
    """Names, sizes and modification times of a local checkpoint's weight files: a retrained model in the same
    folder gets a new fingerprint, so its old predictions are not silently reused."""
    if path is None or not Path(path).is_dir():
        return None
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(stats).encode()).hexdigest()[:16]


def processor_source(base: str, adapter: str | None) -> str:
    """An adapter folder saved with its processor (as `cppo.main` does) wins over the base model's."""
    if adapter and any(
        (Path(adapter) / name).exists() for name in ("preprocessor_config.json", "processor_config.json")
    ):
        return adapter
    return base


def load_model(base: str, adapter: str | None, dtype: torch.dtype, device: torch.device, **kwargs):
    """The model in eval mode on `device`; a LoRA adapter is merged into its base (plain weights generate faster)."""
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, **kwargs)
    except OSError as error:
        raise OSError(
            f"could not load model {base!r}: not a local checkpoint, and the Hub load failed: {error}"
        ) from error
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        logger.info("merged LoRA adapter %s into %s", adapter, base)
    return model.to(device).eval()


def merged_checkpoint(base: str, adapter: str, folder: Path, trust_remote_code: bool = False) -> str:
    """Write base + adapter merged into `folder` once (vLLM loads plain checkpoints) and return it."""
    marker = folder / "merged_from.json"
    expected = {"base": base, "adapter": str(Path(adapter).resolve())}
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return str(folder)
    model = load_model(base, adapter, torch.bfloat16, torch.device("cpu"), trust_remote_code=trust_remote_code)
    model.save_pretrained(folder)
    load_processor(processor_source(base, adapter), trust_remote_code=trust_remote_code).save_pretrained(folder)
    marker.write_text(json.dumps(expected))
    return str(folder)


def chat_text(processor, messages: list[dict[str, Any]]) -> str:
    """The chat-templated prompt; dataset image parts carry `text: None` (Arrow schema), which templates reject."""
    clean = [
        {
            "role": message["role"],
            "content": [
                {"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]}
                for part in message["content"]
            ],
        }
        for message in messages
    ]
    return processor.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)


# --- backends -----------------------------------------------------------------------------------------------------


class TransformersBackend:
    """Batched HF `generate`: `batch_size` prompts per call, k completions each via `num_return_sequences`."""

    def __init__(self, model, processor, sampling: SamplingConfig, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.sampling, self.chunk_size = model, processor, sampling, batch_size
        ids = {k: getattr(model.generation_config, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
        if ids["pad_token_id"] is None:
            ids["pad_token_id"] = processor.tokenizer.pad_token_id
        # Only the token ids of the checkpoint's generation config are kept: its sampling defaults (Qwen ships top_k 1,
        # repetition_penalty 1.05, ...) would otherwise change the protocol.
        model.generation_config = GenerationConfig(**ids)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt]) -> list[list[str]]:
        sampling = self.sampling
        texts = [chat_text(self.processor, p.messages) for p in prompts]
        images = [p.images for p in prompts]
        encoded = self.processor(
            text=texts, images=images if any(images) else None, return_tensors="pt", padding=True
        ).to(self.model.device)
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            num_return_sequences=sampling.num_samples,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
        )
        processors = LogitsProcessorList()
        if not sampling.greedy:
            seeds = [sample_seed(sampling.seed, p.key, draw) for p in prompts for draw in range(sampling.num_samples)]
            processors.append(PerSampleSampler(seeds, sampling, self.model.device))
        output = self.model.generate(**encoded, generation_config=config, logits_processor=processors)
        decoded = self.processor.batch_decode(output[:, encoded["input_ids"].size(1) :], skip_special_tokens=True)
        k = sampling.num_samples
        return [decoded[i * k : (i + 1) * k] for i in range(len(prompts))]


class VLLMBackend:
    """vLLM offline engine: one request per prompt, `n=k` completions, per-request seed from the sample key."""

    def __init__(
        self,
        model_path: str,
        processor,
        sampling: SamplingConfig,
        *,
        chunk_size: int = 256,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_images_per_prompt: int = 1,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        vllm = import_vllm()
        self.processor, self.sampling, self.chunk_size = processor, sampling, chunk_size
        self._sampling_params = vllm.SamplingParams
        mm_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        engine_kwargs = {
            "model": model_path,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": sampling.seed,
            "limit_mm_per_prompt": {"image": max(1, max_images_per_prompt)},
            "trust_remote_code": trust_remote_code,
        }
        if max_model_len:
            engine_kwargs["max_model_len"] = max_model_len
        if mm_kwargs:
            engine_kwargs["mm_processor_kwargs"] = mm_kwargs
        self.llm = vllm.LLM(**engine_kwargs)

    def generate(self, prompts: Sequence[Prompt]) -> list[list[str]]:
        sampling = self.sampling
        requests = [
            {"prompt": chat_text(self.processor, p.messages), "multi_modal_data": {"image": p.images}}
            if p.images
            else {"prompt": chat_text(self.processor, p.messages)}
            for p in prompts
        ]
        params = [
            self._sampling_params(
                n=sampling.num_samples,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or -1,  # vLLM's "off"
                repetition_penalty=1.0,
                max_tokens=sampling.max_new_tokens,
                seed=sample_seed(sampling.seed, p.key),
            )
            for p in prompts
        ]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return [[completion.text for completion in output.outputs] for output in outputs]


def import_vllm():
    """`vllm`, imported only for `--backend vllm`; a clear error when it is not installed."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "--backend vllm needs the vllm package, which is not installed: `pip install vllm` (GPU only), "
            "or use --backend transformers"
        ) from error
    return vllm
