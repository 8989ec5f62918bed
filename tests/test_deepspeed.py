"""The cases of `tests/scripts/rank_cases.py` under DeepSpeed on 2 CPU processes (its CPU accelerator, gloo):
ZeRO-3 with every parameter sharded (`stage3_param_persistence_threshold: 0`), where every forward and backward gathers
and the ranks must run the same passes in the same order; and ZeRO-2 on the cases with a text-only rank, whose
gradient buckets would lack the vision tower. The real-engine lane (`make test-engines`) runs these, with the
`[deepspeed]` extra installed; the first DeepSpeed job JIT-builds its `deepspeed_shm_comm` op (40-80 s on 2 cores,
cached in `TORCH_EXTENSIONS_DIR`)."""

import pytest
from rank_case_checks import DUMMIES, check_case, run_cases

from cppo_trl.testing import build_tiny_vlm


pytest.importorskip("deepspeed", reason="the [deepspeed] extra is installed by `make test-engines`")
pytestmark = pytest.mark.engines
TEXT_RANK_CASES = tuple(case for case in DUMMIES if case.endswith("_text_rank"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def zero3(model, tmp_path_factory):
    return run_cases("zero3", model, tmp_path_factory.mktemp("zero3"), timeout=540)


@pytest.fixture(scope="module")
def zero2(model, tmp_path_factory):
    return run_cases("zero2", model, tmp_path_factory.mktemp("zero2"), timeout=420, cases=TEXT_RANK_CASES)


@pytest.mark.parametrize("case", list(DUMMIES))
def test_ranks_with_different_work_run_the_same_passes_under_zero3(case, zero3, model):
    check_case(case, zero3[case], model, sharded=True)
    assert zero3[case][0]["distributed_type"] == "DistributedType.DEEPSPEED"


@pytest.mark.parametrize("case", TEXT_RANK_CASES)
def test_a_text_only_rank_beside_an_image_rank_under_zero2(case, zero2, model):
    check_case(case, zero2[case], model, sharded=True)
