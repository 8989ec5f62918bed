"""`EvalArguments`: everything `cppo-eval` reads from its YAML recipe (`--config`) and the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from cppo_trl.evaluate import benchmarks as registry
from cppo_trl.evaluate.generation import BACKENDS, SamplingConfig


@dataclass
class EvalArguments:
    """Everything `cppo-eval` reads from its YAML recipe (`--config`) and the command line (which wins)."""

    # Model
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder, Hub model id, or LoRA adapter folder (base read from adapter_config)."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16', 'float32'."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is visible."})
    # Data
    benchmarks: list[str] = field(
        default_factory=lambda: list(registry.TABLE1_BENCHMARKS),
        metadata={
            "help": f"Registry names ({', '.join([*registry.REGISTRY, registry.SYNTHETIC])}) and/or local "
            "JSONL/parquet files. Default: the paper's Table 1 seven."
        },
    )
    benchmark_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Local copies as name=path (a folder laid out like the Hub repository, or one data file)."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Only the first N rows of each benchmark (smoke runs; not the protocol)."}
    )
    training_recipe: str | None = field(
        default=None,
        metadata={
            "help": "Training recipe YAML whose prompt_suffix, min/max_pixels, perturbation fields and synthetic "
            "task settings the evaluation reuses (default: the training defaults)."
        },
    )
    prompt_suffix: str | None = field(
        default=None, metadata={"help": "Instruction after each question (default: the recipe's, else training's)."}
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Processor min_pixels (default: the recipe's)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Processor max_pixels (default: the recipe's)."})
    question_column: str = field(default="question", metadata={"help": "Local files: question column."})
    answer_column: str = field(default="answer", metadata={"help": "Local files: answer column."})
    image_column: str = field(default="image", metadata={"help": "Local files: image path(s) column."})
    image_root: str | None = field(default=None, metadata={"help": "Local files: folder of relative image paths."})
    id_column: str | None = field(default=None, metadata={"help": "Local files: id column (default: row number)."})
    options_column: str | None = field(
        default=None, metadata={"help": "Local files: option texts column; its rows become multiple-choice."}
    )
    # Protocol
    num_samples: int = field(default=8, metadata={"help": "k completions per question (paper: 8)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0; 0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (paper: 1.0, off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling, 0 = off (paper: off)."})
    max_new_tokens: int = field(
        default=2048, metadata={"help": "Completion budget (the authors' VLMEvalKit default: 2048)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; each sample's draws are seeded by (seed, sample id)."})
    # Backend
    backend: str = field(default="transformers", metadata={"help": "Generation backend.", "choices": list(BACKENDS)})
    batch_size: int = field(
        default=8,
        metadata={"help": "Prompts per generation call (vLLM: per request batch) and per predictions flush."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model (one node)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory to use."})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: context length (default: model's)."})
    # Perturbation audit
    perturb: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Also evaluate with every image replaced by a view: 'preserving' / 'removing' (each transform of "
            "the recipe's set, one row each) or transform names; 'none' turns a recipe's list off. Writes "
            "perturbation_audit.md."
        },
    )
    # Outputs
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and results go."})
    run_name: str | None = field(default=None, metadata={"help": "Row label in tables (default: the model name)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete predictions made with other settings instead of refusing."}
    )
    model_card: bool = field(
        default=False, metadata={"help": "Append the results table to the local model folder's README.md."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Append the results table to the Hub model card."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository for --push_to_hub (default: the evaluated Hub id)."}
    )

    def __post_init__(self) -> None:
        _ = self.sampling  # validates the protocol fields, naming the bad one
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            self.num_samples, self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.seed
        )
