"""The rails every perception trainer rides on (`PerceptionGRPOTrainer`): images reach TRL as the dataset gives them,
occlusion aligned with the processor's vision-token grid, and a default config per method. (The vLLM fixes are in
`tests/test_vllm_fixes.py`.)"""

import numpy as np
import pytest
import torch
from conftest import generation_batch, hashed_reward, make_trainer, rollout_of, textured_image
from datasets import Dataset

from cppo_trl.core.images import PixelBudget
from cppo_trl.trainer.cppo_trainer import REMOVED


def _rows(images, text="What colour is the top left block?"):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return Dataset.from_list([{"prompt": prompt, "images": [image]} for image in images])


def test_images_reach_trl_as_the_dataset_gives_them(tiny_qwen, tmp_path):
    """A 300x200 image above the tiny processor's 112x112-pixel cap: nothing resizes it before the processor, so TRL's
    processor, the views and the budget's prediction agree on one grid, the processor's own."""
    image = textured_image(1, 300).resize((300, 200))
    trainer = make_trainer(tiny_qwen, tmp_path, dataset=_rows([image]))
    budget = trainer._pixel_budget
    assert budget == PixelBudget(factor=28, min_pixels=784, max_pixels=12544)
    inputs = generation_batch(trainer)
    assert trainer._rollouts[0].images[0].size == (300, 200) and trainer._rollouts[0].sources == ("dataset",)
    assert np.array_equal(np.asarray(trainer._rollouts[0].images[0]), np.asarray(image))
    columns, rows = budget.token_grid(300, 200)
    assert inputs["image_grid_thw"].tolist() == [[1, 2 * rows, 2 * columns]] * 4  # 14-px patches, merged 2x2
    view = next(v for v in inputs["cppo_views"] if v is not None)
    for name in ("preserved", "removed"):
        assert view.tensors[name]["image_grid_thw"].tolist() == [[1, 2 * rows, 2 * columns]]


def _black_tokens(processor, image) -> list[bool]:
    """Per merged vision token of the processed image: are at least 90% of its values the normalised black?"""
    encoded = processor.image_processor(images=[image], return_tensors="pt")
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1)
    patches = encoded["pixel_values"].view(-1, 4, 3, 2 * 14 * 14)  # (tokens, 2x2 merged patches, C, T*P*P)
    black = ((patches - (-mean / std)).abs() < 0.05).float().mean(dim=(1, 2, 3))
    return (black > 0.9).tolist()


def test_occlusion_hides_whole_vision_tokens(tiny_qwen, tmp_path):
    """An off-grid 310x190 image: the removing view blackens whole cells of the processor's token grid (in the image's
    own pixels, each cell all black or untouched), and after the processor's resize each black cell is one black
    vision token, never a fraction of two."""
    image = textured_image(2, 300).resize((310, 190))
    trainer = make_trainer(
        tiny_qwen, tmp_path, dataset=_rows([image]), removing_perturbations=["patch_occlusion"], occlusion_ratio=0.5
    )
    assert trainer._align_occlusion
    views = trainer._make_view_images(rollout_of({"prompt": _rows([image])[0]["prompt"], "images": [image]}), b"key")
    removed, original = np.asarray(views.images[REMOVED][0]), np.asarray(image)
    columns, rows = trainer._pixel_budget.token_grid(310, 190)
    xs = [round(c * 310 / columns) for c in range(columns + 1)]
    ys = [round(r * 190 / rows) for r in range(rows + 1)]
    cells = [(slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1])) for r in range(rows) for c in range(columns)]
    black = [(removed[cell] == 0).all() for cell in cells]
    untouched = [np.array_equal(removed[cell], original[cell]) for cell in cells]
    assert all(b or u for b, u in zip(black, untouched, strict=True))
    assert sum(black) == round(0.5 * len(cells))
    assert sum(_black_tokens(trainer.processing_class, views.images[REMOVED][0])) == sum(black)


def test_explicit_occlusion_patch_size_wins(tiny_qwen, tmp_path):
    trainer = make_trainer(tiny_qwen, tmp_path, occlusion_patch_size=14)
    assert trainer._perturbation_params.occlusion_patch_size == 14 and not trainer._align_occlusion


@pytest.mark.parametrize("method", ["cppo", "papo"])
def test_trainer_without_args_builds_its_methods_default_config(tiny_qwen, tmp_path, monkeypatch, method):
    from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer

    trainer_cls, config_cls, other = {
        "cppo": (CPPOTrainer, CPPOConfig, PAPOConfig),
        "papo": (PAPOTrainer, PAPOConfig, CPPOConfig),
    }[method]

    class OnCPU(config_cls):  # a default config asks for bf16 on this GPU-less machine; only the device differs
        def __init__(self, output_dir, **kwargs):
            super().__init__(output_dir=output_dir, use_cpu=True, report_to="none", **kwargs)

    monkeypatch.setattr(trainer_cls, "_config_class", OnCPU)
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    trainer = trainer_cls(model=str(tiny_qwen), reward_funcs=hashed_reward, train_dataset=_rows([textured_image(3)]))
    assert type(trainer.args) is OnCPU
    assert trainer.args.output_dir == f"{tiny_qwen.name}-{method.upper()}"
    assert (trainer.args.beta, trainer.args.num_generations, trainer.args.per_device_train_batch_size) == (0.01, 5, 10)
    monkeypatch.undo()
    with pytest.raises(TypeError, match=f"{trainer_cls.__name__} needs a {config_cls.__name__}, got {other.__name__}"):
        trainer_cls(
            model=str(tiny_qwen),
            reward_funcs=hashed_reward,
            args=other(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none"),
            train_dataset=_rows([textured_image(3)]),
        )
