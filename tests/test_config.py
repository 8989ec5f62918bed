"""CPPOConfig: paper defaults, the released preset, explicit values winning, and validation errors."""

import math

import pytest

from cppo_trl import CPPOConfig, PerturbationParams
from cppo_trl.trainer.cppo_config import PRESET_VALUES


def make(**kwargs):
    return CPPOConfig(output_dir="/tmp/cppo-config-test", use_cpu=True, bf16=False, report_to="none", **kwargs)


def test_paper_defaults():
    args = make()
    assert args.cppo_preset == "paper"
    assert args.cpl_weight == 0.02 and args.cpl_temperature == 0.1 and args.perception_top_fraction == 0.5
    assert (args.perception_score, args.cpl_divergence, args.cpl_aggregation) == ("raw", "full", "all_tokens")
    assert args.advantage_gating and args.perception_token_selection and args.cpl_grad_through_views
    assert args.removing_perturbations == ["patch_occlusion", "zoom_crop"]
    assert args.preserving_perturbations == ["color_jitter", "perspective", "rotation", "gaussian_blur"]
    assert args.zoom_crop_side_range[0] ** 2 == pytest.approx(0.3)  # 30% of the area kept
    assert args.beta == 0.01 and args.num_generations == 5  # paper Table 8, not TRL's 0.0 and 8


def test_released_preset_sets_every_field():
    args = make(cppo_preset="released")
    for name, value in PRESET_VALUES["released"].items():
        assert getattr(args, name) == value, name
    assert args.cpl_weight == 0.01 and args.cpl_divergence == "k3"
    assert args.perception_score == "normalized" and args.cpl_aggregation == "selected_tokens"
    assert "gaussian_blur" not in args.preserving_perturbations
    assert args.removing_perturbations == ["noise_rectangles", "zoom_crop"]
    assert set(PRESET_VALUES["paper"]) == set(PRESET_VALUES["released"])  # both presets cover the same points


def test_explicit_value_wins_over_preset():
    args = make(cppo_preset="released", cpl_weight=0.03, cpl_divergence="full")
    assert args.cpl_weight == 0.03 and args.cpl_divergence == "full"
    assert args.perception_score == "normalized"  # the rest still comes from the preset


def test_perturbation_params_mirror_the_config():
    params = make(occlusion_ratio=0.6, rotation_degrees=5.0).perturbation_params
    assert isinstance(params, PerturbationParams)
    assert params.occlusion_ratio == 0.6 and params.rotation_degrees == 5.0
    assert params.removing_perturbations == ("patch_occlusion", "zoom_crop")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"perception_top_fraction": 0.0}, "perception_top_fraction"),
        ({"perception_top_fraction": 1.5}, "perception_top_fraction"),
        ({"cpl_temperature": 0.0}, "cpl_temperature"),
        ({"cpl_temperature": -1.0}, "cpl_temperature"),
        ({"cpl_weight": -0.01}, "cpl_weight"),
        ({"cpl_weight": math.nan}, "cpl_weight"),
        ({"cpl_chunk_size": 0}, "cpl_chunk_size"),
        ({"cppo_preset": "verl"}, "cppo_preset"),
        ({"perception_score": "entropy"}, "perception_score"),
        ({"cpl_divergence": "jsd"}, "cpl_divergence"),
        ({"cpl_aggregation": "sum"}, "cpl_aggregation"),
        ({"removing_perturbations": []}, "removing_perturbations"),
        ({"removing_perturbations": ["blackout"]}, "removing_perturbations"),
        ({"preserving_perturbations": ["sharpen"]}, "preserving_perturbations"),
        ({"occlusion_ratio": 1.5}, "occlusion_ratio"),
        ({"gaussian_blur_kernel_size": 4}, "gaussian_blur_kernel_size"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make(**kwargs)
