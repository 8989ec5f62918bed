"""cppo-eval's protocol pieces with numbers: accuracy@k and its std over draws, the seeded sampler, batching and
process sharding that do not change draws, model loading (checkpoint, LoRA adapter, missing path), the vLLM request
shape, model-card sections, and refusals that leave no results file behind."""

import dataclasses
import json
import shutil
import statistics
import sys
import threading
import types

import pytest
import torch

from cppo_trl.evaluate import arguments, cli, evaluation, generation, report, runner
from cppo_trl.evaluate.generation import SamplingConfig, filter_logits, gumbel_choice


RECIPE = "recipes/tiny/cppo/config_demo_cpu.yaml"
SMALL = {"training_recipe": RECIPE, "max_new_tokens": 4, "max_samples": 4, "num_samples": 2}


# --- accuracy@k arithmetic ----------------------------------------------------------------------------------------


def test_accuracy_at_k_and_std_over_draws():
    scores = [[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]  # 4 samples x 3 draws
    summary = report.benchmark_summary("B", scores)
    assert summary["per_draw"] == [0.5, 0.25, 0.75]
    assert summary["accuracy"] == pytest.approx(0.5)  # = mean per-sample score (2/3 + 1/3 + 1 + 0) / 4
    assert summary["accuracy"] == pytest.approx(statistics.fmean(statistics.fmean(row) for row in scores))
    assert summary["std"] == pytest.approx(0.25)  # sample std of (0.5, 0.25, 0.75)
    other = report.benchmark_summary("C", [[1, 1, 0], [1, 0, 0]])  # per draw (1, 0.5, 0)
    overall = report.overall_summary({"b": summary, "c": other})
    assert overall["average"] == pytest.approx((0.5 + 0.5) / 2)
    assert overall["average_std"] == pytest.approx(statistics.stdev([0.75, 0.375, 0.375]))


def test_single_draw_has_no_std_and_ragged_scores_fail():
    assert report.benchmark_summary("B", [[1], [0]])["std"] is None
    with pytest.raises(ValueError, match="every sample needs 2 scores"):
        report.draw_accuracies([[1, 0], [1]])
    with pytest.raises(ValueError, match="no scored samples"):
        report.draw_accuracies([])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_samples", 0, "num_samples must be an integer >= 1"),
        ("temperature", -1.0, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in"),
        ("top_k", -1, "top_k must be an integer"),
        ("max_new_tokens", 0, "max_new_tokens"),
    ],
)
def test_protocol_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        arguments.EvalArguments(model_name_or_path="m", **{field: value})


def test_greedy_needs_one_sample():
    with pytest.raises(ValueError, match="greedy.*--num_samples 1 --temperature 0"):
        SamplingConfig(num_samples=8, temperature=0.0)
    assert SamplingConfig(num_samples=1, temperature=0.0).greedy


# --- sampling -----------------------------------------------------------------------------------------------------


def test_gumbel_sampling_matches_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 40000
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(draws, 4, generator=generator)
    counts = torch.bincount(gumbel_choice(logits.expand(draws, 4), uniform), minlength=4).float() / draws
    assert torch.allclose(counts, logits.softmax(-1), atol=0.01)
    hot = gumbel_choice((logits / 0.5).expand(draws, 4), uniform)  # temperature 0.5 sharpens
    assert (hot == 0).float().mean() > counts[0] + 0.1


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=1.0)).all()


def test_per_sample_sampler_ignores_the_batch():
    config = SamplingConfig(num_samples=1)
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    together = generation.PerSampleSampler([11, 22, 33], config, torch.device("cpu"))(None, scores)
    alone = generation.PerSampleSampler([22], config, torch.device("cpu"))(None, scores[1:2])
    assert together.argmax(-1)[1] == alone.argmax(-1)[0]
    assert torch.isfinite(together).sum(-1).tolist() == [1, 1, 1]  # exactly one allowed token per row
    with pytest.raises(RuntimeError, match="3 rows to sample but 2 seeded generators"):
        generation.PerSampleSampler([1, 2], config, torch.device("cpu"))(None, scores)


def test_draws_do_not_depend_on_batching(tiny_qwen, tmp_path):
    one = evaluation.evaluate_model(tiny_qwen, "synthetic", batch_size=1, **SMALL)["predictions"]
    four = evaluation.evaluate_model(tiny_qwen, "synthetic", batch_size=4, **SMALL)["predictions"]
    assert [r["completions"] for r in one] == [r["completions"] for r in four]
    assert len({tuple(r["completions"]) for r in one}) == 4  # different samples draw differently
    reseeded = evaluation.evaluate_model(tiny_qwen, "synthetic", batch_size=4, seed=7, **SMALL)["predictions"]
    assert [r["completions"] for r in reseeded] != [r["completions"] for r in one]


def test_sharded_processes_give_the_single_process_results(tiny_qwen, tmp_path):
    """Two data-parallel ranks (threads meeting at a barrier, as processes under accelerate do) fill per-rank files
    that the main rank gathers into the same predictions and results as one process."""
    args = arguments.EvalArguments(
        model_name_or_path=str(tiny_qwen), benchmarks=["synthetic"], output_dir=str(tmp_path / "single"), **SMALL
    )
    settings = evaluation.resolve_settings(args)
    loaded = evaluation.load_benchmarks(args, settings)
    single = runner.build_runtime(args, settings, loaded)
    expected = runner.run_one(args, settings, loaded, single, tmp_path / "single")
    barrier = threading.Barrier(2)
    returned, lines = {}, {}

    def rank(index):
        runtime = dataclasses.replace(single, rank=index, world_size=2, barrier=barrier.wait)
        original = single.backend.generate

        def counting(prompts):
            lines[index] = lines.get(index, 0) + len(prompts)
            return original(prompts)

        runtime.backend = types.SimpleNamespace(generate=counting, chunk_size=single.backend.chunk_size)
        returned[index] = runner.run_one(args, settings, loaded, runtime, tmp_path / "sharded")

    threads = [threading.Thread(target=rank, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lines == {0: 2, 1: 2} and returned[1] is None
    assert not list((tmp_path / "sharded").glob("predictions.rank*.jsonl"))
    assert runner.read_predictions(tmp_path / "sharded") == runner.read_predictions(tmp_path / "single")
    drop = {"created"}
    assert {k: v for k, v in returned[0].items() if k not in drop} == {
        k: v for k, v in expected.items() if k not in drop
    }


def test_interrupted_parallel_parts_are_gathered(tmp_path):
    record = {"benchmark": "b", "id": "1", "scores": [1.0]}
    (tmp_path / "predictions.rank0.jsonl").write_text(json.dumps(record) + "\n" + '{"benchmark": "b", "id"')
    (tmp_path / "predictions.rank1.jsonl").write_text(json.dumps({**record, "id": "2"}) + "\n")
    runner.gather_parts(tmp_path)
    assert sorted(runner.read_predictions(tmp_path)) == [("b", "1"), ("b", "2")]
    assert not list(tmp_path.glob("predictions.rank*"))


def test_greedy_pass_at_1(tiny_qwen):
    results = evaluation.evaluate_model(tiny_qwen, "synthetic", **{**SMALL, "num_samples": 1, "temperature": 0.0})
    assert results["benchmarks"]["synthetic"]["std"] is None
    again = evaluation.evaluate_model(
        tiny_qwen, "synthetic", **{**SMALL, "num_samples": 1, "temperature": 0.0, "seed": 3}
    )
    assert [r["completions"] for r in again["predictions"]] == [r["completions"] for r in results["predictions"]]


# --- model loading ------------------------------------------------------------------------------------------------


def test_lora_adapter_is_merged_into_its_base(tiny_qwen, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_qwen), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    model.save_pretrained(tmp_path / "adapter")
    base, adapter = generation.resolve_model(str(tmp_path / "adapter"))
    assert (base, adapter) == (str(tiny_qwen), str(tmp_path / "adapter"))
    merged = generation.load_model(base, adapter, torch.float32, torch.device("cpu"))
    reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen), adapter).eval()
    plain = AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(merged(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3)
    results = evaluation.evaluate_model(tmp_path / "adapter", "synthetic", **SMALL)
    assert results["model"] == str((tmp_path / "adapter").resolve()) and results["complete"]


def test_missing_checkpoint_is_named_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    for missing in (tmp_path / "no-such-checkpoint", "./relative/missing", "org/name/too/deep"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            evaluation.evaluate_model(missing, "synthetic", output_dir=out, **SMALL)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json nor adapter_config.json"):
        generation.resolve_model(str(tmp_path / "empty"))
    assert generation.resolve_model("Qwen/Qwen2.5-VL-3B-Instruct") == ("Qwen/Qwen2.5-VL-3B-Instruct", None)


def test_bad_benchmarks_fail_before_any_output(tiny_qwen, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown benchmark.*'mathvist'"):
        cli.main(["--model_name_or_path", str(tiny_qwen), "--benchmarks", "mathvist", "--output_dir", str(out)])
    (tmp_path / "set.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "lost.png"}))
    with pytest.raises(ValueError, match="lost.png"):
        evaluation.evaluate_model(tiny_qwen, [str(tmp_path / "set.jsonl")], output_dir=out, max_new_tokens=2)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="benchmark 'empty'.*has no rows"):
        evaluation.evaluate_model(tiny_qwen, [str(tmp_path / "empty.jsonl")], output_dir=out, max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown --perturb value 'blurr'"):
        evaluation.evaluate_model(tiny_qwen, "synthetic", output_dir=out, perturb=["blurr"], **SMALL)
    assert not out.exists()


def test_other_settings_are_refused_not_mixed(tiny_qwen, tmp_path):
    evaluation.evaluate_model(tiny_qwen, "synthetic", output_dir=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="other settings.*temperature: 1.0 -> 0.7"):
        evaluation.evaluate_model(tiny_qwen, "synthetic", output_dir=tmp_path, temperature=0.7, **SMALL)
    kept = json.loads((tmp_path / "results.json").read_text())  # the finished run stays, untouched
    assert kept["protocol"]["temperature"] == 1.0
    redone = evaluation.evaluate_model(
        tiny_qwen, "synthetic", output_dir=tmp_path, temperature=0.7, overwrite_output_dir=True, **SMALL
    )
    assert redone["protocol"]["temperature"] == 0.7
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4


# --- vLLM ---------------------------------------------------------------------------------------------------------


def test_vllm_missing_is_a_clear_error(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ImportError, match="--backend vllm needs the vllm package.*pip install vllm"):
        evaluation.evaluate_model(tiny_qwen, "synthetic", output_dir=tmp_path, backend="vllm", **SMALL)
    assert not (tmp_path / "results.json").exists()


def test_vllm_requests(tiny_qwen, tmp_path, monkeypatch):
    """The request vLLM receives (a recording stand-in for the engine): one request per prompt with n = k, a seed
    per sample, the processor's pixel limits (vLLM's processor resizes with them, as ours does), the dataset's images
    as they are, tensor parallelism."""
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, requests, sampling_params, use_tqdm):
            calls.setdefault("requests", []).extend(requests)
            calls.setdefault("params", []).extend(sampling_params)
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(text=r"\boxed{red}")] * p.n)
                for p in sampling_params
            ]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=types.SimpleNamespace))
    results = evaluation.evaluate_model(
        tiny_qwen,
        "synthetic",
        backend="vllm",
        tensor_parallel_size=2,
        max_pixels=56 * 56,
        **{**SMALL, "num_samples": 3},
    )
    engine = calls["engine"]
    assert engine["tensor_parallel_size"] == 2 and engine["mm_processor_kwargs"] == {"max_pixels": 56 * 56}
    assert engine["limit_mm_per_prompt"] == {"image": 1} and engine["seed"] == 42
    assert len(calls["requests"]) == 4 and all(p.n == 3 and p.temperature == 1.0 for p in calls["params"])
    assert all(p.top_k == -1 and p.top_p == 1.0 and p.max_tokens == 4 for p in calls["params"])
    assert len({p.seed for p in calls["params"]}) == 4
    assert all(r["multi_modal_data"]["image"][0].size == (112, 112) for r in calls["requests"])  # not pre-resized
    assert all("<|image_pad|>" in r["prompt"] for r in calls["requests"])
    solutions = [r["solution"] for r in results["predictions"]]
    assert results["average"] == pytest.approx(solutions.count("red") / 4)


# --- model card ---------------------------------------------------------------------------------------------------


def test_model_card_section_is_appended_once(tiny_qwen, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen, model)
    (model / "README.md").write_text("# My model\n\nTrained with CPPO.\n")
    for _ in range(2):
        evaluation.evaluate_model(model, "synthetic", output_dir=tmp_path / "eval", model_card=True, **SMALL)
    card = (model / "README.md").read_text()
    assert card.startswith("# My model\n\nTrained with CPPO.\n")
    assert card.count(report.CARD_START) == 1 and "| Model | Synthetic | Avg |" in card
    with pytest.raises(ValueError, match="--model_card appends to a local model folder"):
        evaluation.evaluate_model("org/model", "synthetic", model_card=True, **SMALL)
    with pytest.raises(ValueError, match="--push_to_hub with a local model needs --hub_model_id"):
        evaluation.evaluate_model(model, "synthetic", push_to_hub=True, **SMALL)
