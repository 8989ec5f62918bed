"""Shared fixtures: one tiny offline Qwen2.5-VL per session, a small image dataset and a reward with variance."""

import hashlib

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from cppo_trl.testing import build_tiny_vlm


# Tiny models are overhead-bound: one thread is faster than two, and ~10x faster when other processes load the cores.
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return build_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("models") / "qwen2_5_vl")


def textured_image(seed: int, size: int = 112) -> Image.Image:
    """Random blocks: unlike a flat colour, a zoom crop or an occlusion really changes it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((size // 8, size // 8, 1), dtype=np.uint8)))


def make_dataset(num_rows: int = 8, with_text_only_row: bool = False) -> Dataset:
    rows = []
    for i in range(num_rows):
        content = [{"type": "image"}, {"type": "text", "text": "What colour is the top left block?"}]
        rows.append({"prompt": [{"role": "user", "content": content}], "images": [textured_image(i)]})
    if with_text_only_row:
        rows[-1] = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}], "images": []}
    return Dataset.from_list(rows)


def hashed_reward(completions, **kwargs):
    """Deterministic reward with variance inside every group, so advantages (and CPL) are live from step one."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [int(hashlib.md5(t.encode()).hexdigest(), 16) % 5 / 4 for t in texts]


@pytest.fixture
def dataset():
    return make_dataset()
