"""Fails loudly when a TRL hook CPPOTrainer overrides or relies on changes (signatures and the behaviour used)."""

import inspect

from trl import GRPOTrainer
from trl.trainer import utils as trl_utils

from cppo_trl import CPPOTrainer


def params(func):
    return list(inspect.signature(func).parameters)


def test_overridden_hook_signatures():
    assert params(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert params(GRPOTrainer._generate) == ["self", "prompts"]
    assert params(GRPOTrainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert params(GRPOTrainer._get_per_token_logps_and_entropies) == [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
        "pixel_values",
        "image_grid_thw",
        "num_images",
        "pixel_attention_mask",
        "spatial_shapes",
        "num_tiles",
        "image_sizes",
        "token_type_ids",
        "mm_token_type_ids",
        "image_position_ids",
    ]


def test_compute_loss_takes_the_anchor_from_exactly_one_policy_pass():
    """CPPO captures the anchor from the first `_get_per_token_logps_and_entropies` call inside `_compute_loss`."""
    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert source.count("self._get_per_token_logps_and_entropies(") == 1
    assert "compute_entropy=True" in source
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
        assert f'"{loss_type}"' in source, f"loss_type {loss_type} changed: re-check CPPO's CPL normalisers"
    assert "self.current_gradient_accumulation_steps / self.args.steps_per_generation" in source


def test_generate_returns_the_tuple_cppo_unpacks():
    source = inspect.getsource(GRPOTrainer._generate)
    assert (
        "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images"
        in source
    )


def test_generation_batch_layout_cppo_relies_on():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ('"advantages"', '"num_images"', '"prompt_ids"', '"prompt_mask"', '"num_items_in_batch"'):
        assert key in source
    assert "prompt_inputs = self.processing_class(images=images, text=prompts_text" in source
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "shuffle_sequence_dict" in prepare and "split_tensor_dict" in prepare
    # A per-sample list is permuted and sliced with the rows (the view storage depends on it).
    assert "return [v[i] for i in permutation]" in inspect.getsource(trl_utils.shuffle_sequence_dict)
    assert "isinstance(tensor, list)" in inspect.getsource(trl_utils.split_tensor_dict)


def test_fused_head_runs_base_model_then_scales_softcaps_and_tempers():
    source = inspect.getsource(trl_utils.add_fused_lm_head)
    assert 'backbone_attr = "base_model"' in source
    from trl.kernels import chunked_logprob

    transform = inspect.getsource(chunked_logprob._torch_transform)
    assert "z * logit_scale" in transform and "softcap * torch.tanh(z / softcap)" in transform
    assert "z * inv_t" in transform


def test_trainer_identity_for_the_model_card():
    assert CPPOTrainer._name == "CPPO"
    assert "cppo" in CPPOTrainer._tag_names
    assert "Contrastive Perception" in CPPOTrainer._paper["title"]
    assert "@article" in CPPOTrainer._paper["citation"]


def test_vllm_generate_reports_the_prompt_ids_trl_discards():
    """The vLLM guard wraps `vllm_generation.generate` and reads its first return value, which TRL drops."""
    from trl.generation.vllm_generation import VLLMGeneration

    assert params(VLLMGeneration.generate) == ["self", "prompts", "images", "num_generations", "profiler"]
    assert "Tuple of (prompt_ids, completion_ids, logprobs, logprob_token_ids)" in VLLMGeneration.generate.__doc__
    source = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert "_, completion_ids, logprobs, _ = self.vllm_generation.generate(" in source
    assert "prompts=prompt_ids" in source and "images=images" in source


def test_papo_identity_for_the_model_card():
    from cppo_trl import PAPOTrainer

    assert PAPOTrainer._name == "PAPO" and "papo" in PAPOTrainer._tag_names
    assert PAPOTrainer._paper["id"] == "2507.06448"
    assert "Perception-Aware Policy Optimization" in PAPOTrainer._paper["title"]


def test_old_logps_pass_papo_mirrors():
    """PAPO's masked pass copies TRL's old-log-prob pass: no grad, checkpointing off, micro-batch-sized chunks."""
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert (
        "with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)"
        in (source)
    )
    assert 'batch_size = self.args.per_device_train_batch_size if mode == "train" else' in source


def test_zero_dim_tensors_stay_whole_through_shuffle_and_split():
    """PAPO's per-batch mask cell counts are 0-dim tensors that every micro-batch must carry unchanged."""
    assert "v.ndim == 0" in inspect.getsource(trl_utils.shuffle_sequence_dict)
    assert "tensor.ndim == 0" in inspect.getsource(trl_utils.split_tensor_dict)


def test_delta_caps_the_ratio_like_dual_clip():
    """The PAPO recipes map the authors' dual-clip constant to `delta` (tests/test_papo.py checks the values)."""
    assert "coef_1 = torch.clamp(coef_1, max=self.args.delta)" in inspect.getsource(GRPOTrainer._compute_loss)
