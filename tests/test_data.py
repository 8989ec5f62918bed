import io
import json
import logging
import re
import zipfile
from collections import Counter, defaultdict

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from trl.data_utils import is_conversational, prepare_multimodal_messages

import cppo_trl.data.loaders as data_module
from cppo_trl.data.loaders import DEFAULT_PROMPT_SUFFIX, build_prompt, load_geometry3k, load_local, load_virl39k
from cppo_trl.data.rewards import answer_match_reward
from cppo_trl.data.synthetic import (
    PRIOR_COLORS,
    PRIOR_STRENGTH,
    PRIOR_TASK,
    SYNTHETIC_COLORS,
    make_synthetic_perception_dataset,
    make_synthetic_splits,
)


SIZES = {"a.png": (32, 24), "b.png": (40, 30), "c.png": (20, 50), "d.png": (16, 16)}
VIRL_ROWS = [
    {"qid": "q0", "question": "<image>What is x?", "answer": r"\boxed{3}", "image": ["images/a.png"]},
    {
        "qid": "q1",
        "question": "Compare <image> and <image>. Which is larger?",
        "answer": r"\boxed{B}",
        "image": ["images/b.png", "images/c.png"],
    },
    {"qid": "q2", "question": "Find the area.", "answer": r"\boxed{12}", "image": ["images/d.png"]},
]


def _png(size, color=(200, 10, 10), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _virl_rows(rows=VIRL_ROWS):
    return [{**row, "category": "math", "source": "fixture"} for row in rows]


@pytest.fixture
def virl_folder(tmp_path):
    folder = tmp_path / "virl"
    _write_parquet(folder / "39Krelease.parquet", _virl_rows())
    (folder / "images").mkdir()
    for name, size in SIZES.items():
        (folder / "images" / name).write_bytes(_png(size))
    return folder


@pytest.fixture
def virl_zip_folder(tmp_path):
    folder = tmp_path / "virl_zip"
    _write_parquet(folder / "39Krelease.parquet", _virl_rows())
    with zipfile.ZipFile(folder / "images.zip", "w") as archive:
        for name, size in SIZES.items():
            archive.writestr(f"images/{name}", _png(size))
    return folder


def _texts(content):
    return [part["text"] for part in content if part["type"] == "text"]


def _check_virl(dataset):
    assert len(dataset) == 3
    assert dataset["solution"] == [r"\boxed{3}", r"\boxed{B}", r"\boxed{12}"]
    assert dataset["qid"] == ["q0", "q1", "q2"]
    assert dataset["category"] == ["math"] * 3
    prompts = dataset["prompt"]
    assert [[part["type"] for part in p[0]["content"]] for p in prompts] == [
        ["image", "text"],
        ["text", "image", "text", "image", "text"],
        ["image", "text"],  # no placeholder: images first, like TRL
    ]
    assert _texts(prompts[1][0]["content"]) == ["Compare ", " and ", ". Which is larger?" + DEFAULT_PROMPT_SUFFIX]
    assert _texts(prompts[0][0]["content"]) == ["What is x?" + DEFAULT_PROMPT_SUFFIX]
    sizes = [[image.size for image in row] for row in dataset["images"]]
    assert sizes == [[SIZES["a.png"]], [SIZES["b.png"], SIZES["c.png"]], [SIZES["d.png"]]]


def test_virl39k_folder(virl_folder):
    dataset = load_virl39k(virl_folder)
    _check_virl(dataset)
    # Lazy decoding: the table stores paths, images are decoded on access.
    stored = dataset.data.column("images").to_pylist()
    assert all(image["bytes"] is None and image["path"].endswith(".png") for row in stored for image in row)


def test_virl39k_rows_work_with_trl(virl_folder):
    row = load_virl39k(virl_folder, system_prompt="Be brief.")[1]
    assert is_conversational({"prompt": row["prompt"]})
    assert row["prompt"][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    messages = prepare_multimodal_messages(row["prompt"], row["images"])
    filled = [part for part in messages[1]["content"] if part["type"] == "image"]
    assert [part["image"].size for part in filled] == [SIZES["b.png"], SIZES["c.png"]]


def test_virl39k_zip_is_extracted_once(virl_zip_folder, monkeypatch):
    _check_virl(load_virl39k(virl_zip_folder))
    assert (virl_zip_folder / "images" / "a.png").is_file()
    assert not (virl_zip_folder / ".images.extracting").exists()

    def fail(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", fail)
    _check_virl(load_virl39k(virl_zip_folder))


def test_virl39k_zip_extract_dir(virl_zip_folder, tmp_path):
    _check_virl(load_virl39k(virl_zip_folder, extract_dir=tmp_path / "cache"))
    assert (tmp_path / "cache" / "images" / "b.png").is_file()
    assert not (virl_zip_folder / "images").exists()


def test_virl39k_max_images_drops_multi_image_rows(virl_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="cppo_trl.data.loaders"):
        dataset = load_virl39k(virl_folder, max_images=1)
    assert dataset["qid"] == ["q0", "q2"]
    assert "Dropped 1 of 3 rows with more than 1 image" in caplog.text


def test_virl39k_missing_images_and_split(tmp_path, virl_folder):
    folder = tmp_path / "empty"
    _write_parquet(folder / "39Krelease.parquet", _virl_rows())
    with pytest.raises(FileNotFoundError, match="images.zip"):
        load_virl39k(folder)
    with pytest.raises(ValueError, match="single 'train' split"):
        load_virl39k(virl_folder, split="test")


def test_placeholder_mismatch_names_row(virl_folder):
    rows = _virl_rows(
        [*VIRL_ROWS, {"qid": "bad", "question": "<image><image>Q", "answer": "1", "image": ["images/a.png"]}]
    )
    _write_parquet(virl_folder / "39Krelease.parquet", rows)
    with pytest.raises(ValueError, match=r"row 3 \(qid='bad'\).*2 <image> placeholder\(s\) but 1 image"):
        load_virl39k(virl_folder)


def test_missing_image_file_raises(virl_folder):
    (virl_folder / "images" / "c.png").unlink()
    with pytest.raises(ValueError, match=r"row 1 \(qid='q1'\).*image 1 not found.*c\.png"):
        load_virl39k(virl_folder)


def _geometry_rows():
    return [
        {"images": [{"bytes": _png((30, 20)), "path": None}], "problem": "<image>Find x.", "answer": "5"},
        {
            "images": [{"bytes": _png((24, 24), mode="L"), "path": "g.png"}],
            "problem": "<image>Find y.",
            "answer": "60",
        },
    ]


def test_geometry3k_parquet_with_embedded_bytes(tmp_path):
    path = tmp_path / "geo.parquet"
    _write_parquet(path, _geometry_rows())
    dataset = load_geometry3k(path, prompt_suffix=None)
    assert dataset["solution"] == ["5", "60"]
    assert [p[0]["content"] for p in dataset["prompt"]] == [
        [{"type": "image", "text": None}, {"type": "text", "text": "Find x."}],
        [{"type": "image", "text": None}, {"type": "text", "text": "Find y."}],
    ]
    images = [row[0] for row in dataset["images"]]
    assert [image.size for image in images] == [(30, 20), (24, 24)]
    assert {image.mode for image in images} == {"RGB"}  # grayscale source converted on access


def test_geometry3k_folder_splits(tmp_path):
    rows = _geometry_rows()
    _write_parquet(tmp_path / "geo" / "data" / "train-00000-of-00001.parquet", rows)
    _write_parquet(tmp_path / "geo" / "data" / "test-00000-of-00001.parquet", rows[:1])
    assert len(load_geometry3k(tmp_path / "geo")) == 2
    assert len(load_geometry3k(tmp_path / "geo", split="test")) == 1
    with pytest.raises(FileNotFoundError, match="validation"):
        load_geometry3k(tmp_path / "geo", split="validation")


def test_corrupt_image_bytes_raise(tmp_path):
    rows = _geometry_rows()
    rows[1]["images"] = [{"bytes": b"definitely not a png", "path": None}]
    _write_parquet(tmp_path / "geo.parquet", rows)
    with pytest.raises(ValueError, match=r"row 1.*cannot be decoded"):
        load_geometry3k(tmp_path / "geo.parquet")


def test_skip_drops_exactly_the_bad_rows(tmp_path, caplog):
    (tmp_path / "ok.png").write_bytes(_png((10, 10)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    rows = [
        {"id": 0, "question": "<image>ok", "answer": "1", "image": "ok.png"},
        {"id": 1, "question": "<image>missing", "answer": "2", "image": "gone.png"},
        {"id": 2, "question": "<image><image>mismatch", "answer": "3", "image": ["ok.png"]},
        {"id": 3, "question": "<image>broken", "answer": "4", "image": ["broken.png"]},
        {"id": 4, "question": "no answer", "answer": "", "image": "ok.png"},
        {"id": 5, "question": "no image", "answer": "6", "image": []},
        {"id": 6, "question": "also ok", "answer": "7", "image": ["ok.png"]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with caplog.at_level(logging.WARNING, logger="cppo_trl.data.loaders"):
        dataset = load_local(path, on_invalid="skip", id_column="id", keep_columns=("id",))
    assert dataset["id"] == [0, 6]
    assert dataset["solution"] == ["1", "7"]
    message = caplog.text
    assert "Skipped 5 of 7 rows" in message
    for reason in ("missing_image: 1", "placeholder_mismatch: 1", "unreadable_image: 1", "missing_answer: 1"):
        assert reason in message
    assert "no_images: 1" in message
    with pytest.raises(ValueError, match=r"row 1 \(id=1\).*not found"):
        load_local(path, id_column="id")


def test_load_local_jsonl_json_parquet(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(_png((12, 8)))
    (tmp_path / "imgs" / "q.png").write_bytes(_png((8, 12)))
    rows = [
        {"q": "Look <image> here.", "a": "x", "pics": "imgs/p.png"},
        {"q": "Two: <image> then <image>", "a": "y", "pics": ["imgs/p.png", "imgs/q.png"]},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    columns = {"question_column": "q", "answer_column": "a", "image_column": "pics"}
    for dataset in (load_local(tmp_path / "rows.jsonl", **columns), load_local(tmp_path / "rows.json", **columns)):
        assert dataset["solution"] == ["x", "y"]
        assert [[image.size for image in row] for row in dataset["images"]] == [[(12, 8)], [(12, 8), (8, 12)]]
        assert [part["type"] for part in dataset[1]["prompt"][0]["content"]] == ["text", "image", "text", "image"]
    # Paths relative to an explicit image_root, and embedded bytes in parquet.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "rows.jsonl").write_text(json.dumps({"q": "<image>?", "a": "z", "pics": "p.png"}))
    assert load_local(other / "rows.jsonl", **columns, image_root=tmp_path / "imgs")["solution"] == ["z"]
    _write_parquet(tmp_path / "rows.parquet", [{"q": "<image>?", "a": "w", "pics": [_png((5, 6))]}])
    assert load_local(tmp_path / "rows.parquet", **columns)[0]["images"][0].size == (5, 6)
    with pytest.raises(ValueError, match="available columns"):
        load_local(tmp_path / "rows.jsonl")


def test_prompt_suffix_and_system_prompt():
    with_suffix = build_prompt("<image>Q?", 1)
    assert with_suffix == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?" + DEFAULT_PROMPT_SUFFIX}]}
    ]
    assert DEFAULT_PROMPT_SUFFIX.startswith(" You FIRST think") and "<think> </think>" in DEFAULT_PROMPT_SUFFIX
    for disabled in (None, ""):
        assert build_prompt("<image>Q?", 1, prompt_suffix=disabled)[0]["content"][1]["text"] == "Q?"
    custom = build_prompt("Q?", 2, prompt_suffix=" Answer briefly.", system_prompt="S")
    assert custom[0] == {"role": "system", "content": [{"type": "text", "text": "S"}]}
    assert custom[1]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "Q? Answer briefly."},
    ]
    # Whitespace-only text between placeholders is dropped; a prompt without text still gets the suffix.
    assert [p["type"] for p in build_prompt("<image>\n<image>", 2, prompt_suffix=None)[0]["content"]] == ["image"] * 2
    assert build_prompt("<image>", 1, prompt_suffix=" S.")[0]["content"][-1] == {"type": "text", "text": "S."}
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        build_prompt("<image><image>", 3)


# --- synthetic perception task ----------------------------------------------------------------------------------


def _pixels(image):
    array = np.asarray(image.convert("RGB")).astype(int)
    ink = np.any(array != array[0, 0], axis=-1)  # the corner is always background
    return array, ink


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_perception_dataset(240, seed=3)


def _question(row):
    return _texts(row["prompt"][0]["content"])[0]


def test_synthetic_format(synthetic):
    assert Counter(synthetic["task"]) == {"color": 60, "count": 60, "position": 60, "digit": 60}
    row = synthetic[0]
    assert [part["type"] for part in row["prompt"][0]["content"]] == ["image", "text"]
    assert _question(row).endswith(DEFAULT_PROMPT_SUFFIX)
    assert len(row["images"]) == 1 and row["images"][0].size == (112, 112)
    small = make_synthetic_perception_dataset(4, image_size=64, tasks=("digit",), prompt_suffix=None)
    assert small["images"][0][0].size == (64, 64) and set(small["task"]) == {"digit"}
    assert not _question(small[0]).endswith(DEFAULT_PROMPT_SUFFIX)
    with pytest.raises(ValueError, match="valid"):
        make_synthetic_perception_dataset(2, tasks=("smell",))


def test_synthetic_deterministic():
    first, second = make_synthetic_perception_dataset(12, seed=7), make_synthetic_perception_dataset(12, seed=7)
    assert first["solution"] == second["solution"]
    assert all(
        np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
        for a, b in zip(first["images"], second["images"], strict=True)
    )
    other = make_synthetic_perception_dataset(12, seed=8)
    assert any(
        not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
        for a, b in zip(first["images"], other["images"], strict=True)
    )


def test_synthetic_answers_balanced_and_hidden(synthetic):
    expected = {
        "color": set(SYNTHETIC_COLORS),
        "count": {"1", "2", "3", "4"},
        "position": {"left", "right", "top", "bottom"},
        "digit": {str(d) for d in range(10)},
    }
    answers_by_question = defaultdict(set)
    for task, answers in expected.items():
        counts = Counter(s for s, t in zip(synthetic["solution"], synthetic["task"], strict=True) if t == task)
        assert set(counts) == answers
        assert min(counts.values()) >= 0.3 * 60 / len(answers)  # balanced-ish, no answer starved
    for row in synthetic:
        question = _question(row)
        answers_by_question[question].add(row["solution"])
        # The answer never appears in the question except inside the list of options every question shows.
        options = re.sub(r"Answer with.*", "", question)
        assert not re.search(rf"\b{re.escape(row['solution'])}\b", options, re.IGNORECASE)
    # Every question text is shared by several answers: the text alone never determines the answer.
    assert all(len(answers) > 1 for answers in answers_by_question.values())


def test_synthetic_images_encode_the_answer(synthetic):
    ink_by_answer = defaultdict(list)
    for row in synthetic:
        array, ink = _pixels(row["images"][0])
        answer, task = row["solution"], row["task"]
        if task == "color":
            mean = array[ink].mean(axis=0)
            nearest = min(SYNTHETIC_COLORS, key=lambda name: np.abs(np.array(SYNTHETIC_COLORS[name]) - mean).sum())
            assert nearest == answer
        elif task == "position":
            ys, xs = np.nonzero(ink)
            coordinate = xs.mean() if answer in ("left", "right") else ys.mean()
            assert (coordinate < 56) == (answer in ("left", "top"))
        else:
            ink_by_answer[task, answer].append(ink.mean())
    mean_ink = {key: np.mean(values) for key, values in ink_by_answer.items()}
    assert mean_ink["count", "1"] < mean_ink["count", "2"] < mean_ink["count", "3"] < mean_ink["count", "4"]
    assert mean_ink["digit", "1"] < mean_ink["digit", "7"] < mean_ink["digit", "8"]


def test_synthetic_splits_and_reward(synthetic):
    splits = make_synthetic_splits(8, 4, seed=3)
    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "test": 4}
    assert splits["train"]["solution"] == synthetic["solution"][:8]
    train_images = [np.asarray(row[0]) for row in splits["train"]["images"]]
    assert not any(
        np.array_equal(np.asarray(row[0]), image) for row in splits["test"]["images"] for image in train_images
    )
    # The rewards read the `solution` column directly.
    completions = [f"<think>look</think> \\boxed{{{answer}}}" for answer in splits["test"]["solution"]]
    assert answer_match_reward(completions, solution=splits["test"]["solution"]) == [1.0] * 4


def test_prior_task_train_split_has_the_prior_and_the_held_out_split_breaks_it():
    """`shape_color` (make compare): the question names the shape; in train the shape gives the colour 80% of the time,
    in the held-out split colours are uniform and `prior_conflict` says where the shape's training colour is wrong."""
    splits = make_synthetic_splits(600, 600, seed=5, image_size=64, tasks=(PRIOR_TASK,), prompt_suffix=None)
    for name, split in splits.items():
        assert set(split["task"]) == {PRIOR_TASK}
        prior_hits = []
        for row in split:
            kind = next(k for k in PRIOR_COLORS if f"color of the {k} " in _question(row))
            prior_hits.append(row["solution"] == PRIOR_COLORS[kind])
            assert row["prior_conflict"] == (row["solution"] != PRIOR_COLORS[kind])
            array, ink = _pixels(row["images"][0])  # the image shows the answer's colour
            mean = array[ink].mean(axis=0)
            nearest = min(SYNTHETIC_COLORS, key=lambda c: np.abs(np.array(SYNTHETIC_COLORS[c]) - mean).sum())
            assert nearest == row["solution"]
        expected = PRIOR_STRENGTH if name == "train" else 0.25  # held out: 1 of 4 uniform colours
        assert abs(np.mean(prior_hits) - expected) < 4 * np.sqrt(expected * (1 - expected) / 600), name
    colours = Counter(splits["test"]["solution"])
    assert set(colours) == set(SYNTHETIC_COLORS) and min(colours.values()) > 100  # ~150 each
    assert "yellow" not in PRIOR_COLORS.values()  # yellow is always a prior conflict


def test_prior_column_only_with_the_prior_task(synthetic):
    assert "prior_conflict" not in synthetic.column_names
    mixed = make_synthetic_perception_dataset(4, tasks=("color", PRIOR_TASK), prompt_suffix=None)
    assert mixed["task"] == ["color", PRIOR_TASK] * 2 and mixed["prior_conflict"][0] is False


def test_hub_code_paths_with_stubbed_downloads(virl_folder, tmp_path, monkeypatch):
    """The Hub branches (no local path) go through snapshot_download / load_dataset; stub them with local data."""
    calls = []

    def fake_snapshot_download(repo_id, repo_type):
        calls.append((repo_id, repo_type))
        return str(virl_folder)

    monkeypatch.setattr(data_module, "snapshot_download", fake_snapshot_download)
    _check_virl(load_virl39k())
    assert calls == [("TIGER-Lab/ViRL39K", "dataset")]

    hub_like = datasets.Dataset.from_list(_geometry_rows()).cast_column("images", datasets.List(datasets.Image()))
    requested = []

    def fake_load_dataset(path, split):
        requested.append((path, split))
        return hub_like

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_geometry3k(split="test")
    assert requested == [("hiyouga/geometry3k", "test")]
    assert dataset["solution"] == ["5", "60"]
    assert [row[0].size for row in dataset["images"]] == [(30, 20), (24, 24)]


def test_virl39k_paths_relative_to_images_folder(virl_folder):
    rows = [{**row, "image": [path.removeprefix("images/") for path in row["image"]]} for row in VIRL_ROWS]
    _write_parquet(virl_folder / "39Krelease.parquet", _virl_rows(rows))
    _check_virl(load_virl39k(virl_folder))
