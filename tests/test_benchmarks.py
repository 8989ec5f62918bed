"""Every registered benchmark loads from a local copy written in its published schema (generated images, a few rows):
ids, gold answers, options, prompts and pixels arrive where the evaluator expects them; bad input fails by name."""

import json

import datasets
import pytest
from PIL import Image

from cppo_trl.data.loaders import DEFAULT_PROMPT_SUFFIX
from cppo_trl.data.rewards import accuracy_reward
from cppo_trl.evaluate import benchmarks
from cppo_trl.evaluate import schemas as benchmark_schemas


def colour_image(rgb, size=56):
    return Image.new("RGB", (size, size), rgb)


def write_parquet(path, columns, image_columns=(), image_lists=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict(columns)
    for name in image_columns:
        dataset = dataset.cast_column(name, datasets.Image())
    for name in image_lists:
        dataset = dataset.cast_column(name, datasets.List(datasets.Image()))
    dataset.to_parquet(str(path))


RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)


def make_mathvista(root):
    write_parquet(
        root / "data" / "testmini-00000-of-00001-abc.parquet",
        {
            "pid": ["1", "2"],
            "question": ["What is the angle?", "How many bars?"],
            "image": ["images/1.jpg", "images/2.jpg"],
            "decoded_image": [colour_image(RED), colour_image(GREEN)],
            "choices": [["130°", "145°", "165°"], None],
            "answer": ["145°", "3"],
            "question_type": ["multi_choice", "free_form"],
            "answer_type": ["text", "integer"],
            "query": [
                "Hint: answer with the option letter.\nQuestion: What is the angle?\nChoices:\n(A) 130°\n(B) 145°\n(C) 165°",
                "Hint: answer with an integer.\nQuestion: How many bars?",
            ],
        },
        image_columns=["decoded_image"],
    )
    # the big test split must not leak into testmini
    write_parquet(
        root / "data" / "test-00000-of-00002-xyz.parquet",
        {"pid": ["9"], "decoded_image": [colour_image(BLUE)], "query": ["x"], "answer": ["1"]},
        image_columns=["decoded_image"],
    )


def make_dynamath(root):
    for variant in range(1, 11):
        name = f"sample{variant}-00000-of-00001.parquet" if variant % 2 else f"sample_variant{variant}-0.parquet"
        write_parquet(
            root / "data" / name,
            {
                "id": ["1", "2"],
                "question": ["Which is largest? Choices: (A) 3 (B) 5 (C) 7", "What is f(2)?"],
                "image": ["a.png", "b.png"],
                "decoded_image": [colour_image(RED), colour_image((variant, 0, 0))],
                "ground_truth": ["C", str(variant)],
                "answer_type": ["multiple choice", "float"],
                "subject": ["algebra", "algebra"],
                "knowledge_level": ["elementary", "elementary"],
            },
            image_columns=["decoded_image"],
        )


def make_wemath(root):
    write_parquet(
        root / "data" / "testmini-00000-of-00001-adb.parquet",
        {
            "ID": ["1", "1"],
            "split": ["testmini", "testmini"],
            "knowledge concept": ["Angles", "Angles"],
            "question": ["What is angle x?", "What is angle y?"],
            "option": ["A. 30°; B. 45°; C. 60°; D. No correct answer", "A. 1; B. 2"],
            "answer": ["B", "A"],
            "key": ["2steps_1", "2steps_2"],
            "question number": [1, 2],
            "knowledge concept description": ["", ""],
            "image_path": [colour_image(GREEN), colour_image(BLUE)],
        },
        image_columns=["image_path"],
    )


def make_mathvision(root):
    write_parquet(
        root / "data" / "testmini-00000-of-00001.parquet",
        {
            "id": ["11", "12"],
            "question": ["<image1>\nWhich figure is shaded?", "How long is AB? <image1>"],
            "options": [["A", "B", "C", "D", "E"], []],
            "image": ["images/11.jpg", "images/12.jpg"],
            "decoded_image": [colour_image(RED), colour_image(BLUE)],
            "answer": ["D", "2\\sqrt{3}"],
            "solution": ["", ""],
            "level": [1, 2],
            "subject": ["metric geometry", "metric geometry"],
        },
        image_columns=["decoded_image"],
    )


def make_mathverse(root):
    columns = {
        "sample_index": ["1", "2"],
        "problem_index": ["1", "1"],
        "problem_version": ["Text Dominant", "Vision Only"],
        "question": ["Find the angle.\nChoices:\nA:145°\nB:165°\nC:175°", ""],
        "image": [colour_image(RED), colour_image(GREEN)],
        "answer": ["B", "B"],
        "question_type": ["multi-choice", "multi-choice"],
        "query_wo": ["directly answer 1", "directly answer 2"],
        "query_cot": [
            "Please first conduct reasoning, then answer.\nQuestion: Find the angle.\nChoices:\nA:145°\nB:165°\nC:175°",
            "According to the question shown in the image, please first conduct reasoning, then answer.",
        ],
        "question_for_eval": ["", ""],
    }
    write_parquet(root / "testmini.parquet", columns, image_columns=["image"])
    write_parquet(root / "testmini_text_only.parquet", {"sample_index": ["99"], "question": ["text only"]})


def make_mmmu_pro_vision(root):
    columns = {
        "id": ["test_Math_1", "test_Art_2"],
        "image": [colour_image(BLUE), colour_image(RED)],
        "options": ["['$6', '$7', '$8']", "['Monet', 'Manet']"],
        "answer": ["B", "A"],
        "subject": ["Math", "Art"],
    }
    write_parquet(root / "vision" / "test-00000-of-00001.parquet", columns, image_columns=["image"])
    write_parquet(root / "standard (4 options)" / "test-00000-of-00001.parquet", {"id": ["x"], "answer": ["A"]})


def make_logicvista(root):
    (root / "images").mkdir(parents=True)
    colour_image(RED).save(root / "images" / "v1_0.png")
    colour_image(GREEN).save(root / "images" / "v1_1.png")
    entries = {
        "v1_0": {
            "imagename": "v1_0.png",
            "question": "Which choice fits the pattern?",
            "answer": "C",
            "skill": ["inductive"],
        },
        "v1_1": {"imagename": "v1_1.png", "question": "Which belong to the green category?", "answer": "A, C"},
    }
    (root / "dataset.json").write_text(json.dumps(entries))


def make_geometry3k(root):
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "images": [[colour_image(RED)], [colour_image(GREEN)]],
            "problem": ["<image>Find x.", "<image>Find the area."],
            "answer": ["3", "12\\sqrt{2}"],
        },
        image_lists=["images"],
    )
    write_parquet(
        root / "data" / "train-00000-of-00001.parquet",
        {"images": [[colour_image(BLUE)]], "problem": ["<image>train"], "answer": ["1"]},
        image_lists=["images"],
    )


MAKERS = {
    "mathvista": make_mathvista,
    "dynamath": make_dynamath,
    "wemath": make_wemath,
    "mathvision": make_mathvision,
    "mathverse": make_mathverse,
    "mmmu_pro_vision": make_mmmu_pro_vision,
    "logicvista": make_logicvista,
    "geometry3k": make_geometry3k,
}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    for name, make in MAKERS.items():
        make(root / name)
    return root


def test_every_registry_entry_has_a_fixture():
    assert set(MAKERS) == set(benchmarks.REGISTRY)
    assert set(benchmarks.TABLE1_BENCHMARKS) <= set(benchmarks.REGISTRY)


def _text(row):
    return "".join(part["text"] or "" for part in row["prompt"][-1]["content"] if part["type"] == "text")


def _pixel(row, index=0):
    return row["images"][index].getpixel((5, 5))


# (benchmark, expected ids, expected solutions, expected options, expected first-image colours)
EXPECTED = {
    "mathvista": (["1", "2"], ["145°", "3"], [["130°", "145°", "165°"], None], [RED, GREEN]),
    "wemath": (
        ["1-2steps_1", "1-2steps_2"],
        ["B", "A"],
        [["30°", "45°", "60°", "No correct answer"], ["1", "2"]],
        [GREEN, BLUE],
    ),
    "mathvision": (["11", "12"], ["D", "2\\sqrt{3}"], [["A", "B", "C", "D", "E"], None], [RED, BLUE]),
    "mathverse": (["1", "2"], ["B", "B"], [["145°", "165°", "175°"], []], [RED, GREEN]),
    "mmmu_pro_vision": (
        ["test_Math_1", "test_Art_2"],
        ["B", "A"],
        [["$6", "$7", "$8"], ["Monet", "Manet"]],
        [BLUE, RED],
    ),
    "logicvista": (["v1_0", "v1_1"], ["C", "A, C"], [[], []], [RED, GREEN]),
    "geometry3k": (["0", "1"], ["3", "12\\sqrt{2}"], [None, None], [RED, GREEN]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_column_mapping(copies, name):
    loaded = benchmarks.load_benchmark(name, path=copies / name)
    ids, solutions, options, colours = EXPECTED[name]
    assert loaded["id"] == ids
    assert loaded["solution"] == solutions
    assert loaded["options"] == options
    assert [_pixel(row) for row in loaded] == colours
    for row in loaded:
        assert _text(row).endswith(DEFAULT_PROMPT_SUFFIX)  # prompted like training
        assert sum(part["type"] == "image" for part in row["prompt"][-1]["content"]) == len(row["images"]) == 1


def test_prompt_content_per_schema(copies):
    mathvista = benchmarks.load_benchmark("mathvista", path=copies / "mathvista")
    assert "(B) 145°" in _text(mathvista[0]) and _text(mathvista[0]).startswith("Hint:")  # the dataset's own query
    wemath = benchmarks.load_benchmark("wemath", path=copies / "wemath")
    assert "Options: A. 30°; B. 45°" in _text(wemath[0])
    mathvision = benchmarks.load_benchmark("mathvision", path=copies / "mathvision")
    assert "<image1>" not in _text(mathvision[0]) and "(D) D" in _text(mathvision[0])
    mathverse = benchmarks.load_benchmark("mathverse", path=copies / "mathverse")
    assert _text(mathverse[1]).startswith("According to the question shown in the image")  # Vision Only: query_cot
    mmmu = benchmarks.load_benchmark("mmmu_pro_vision", path=copies / "mmmu_pro_vision")
    assert _text(mmmu[0]).startswith(benchmark_schemas.MMMU_PRO_VISION_QUESTION)
    geometry = benchmarks.load_benchmark("geometry3k", path=copies / "geometry3k")
    content = geometry[0]["prompt"][-1]["content"]
    assert content[0]["type"] == "image" and content[1]["text"].startswith("Find x.")


def test_dynamath_keeps_all_ten_variants(copies):
    loaded = benchmarks.load_benchmark("dynamath", path=copies / "dynamath")
    assert len(loaded) == 20 and len(set(loaded["id"])) == 20
    assert loaded["id"][:4] == ["1-v1", "2-v1", "1-v2", "2-v2"]
    assert loaded["solution"][1::2] == [str(v) for v in range(1, 11)]
    assert loaded["options"][0] == ["3", "5", "7"] and loaded["options"][1] is None
    assert [row["images"][0].getpixel((0, 0))[0] for row in loaded][1::2] == list(range(1, 11))


def test_multi_image_rows_keep_every_image(tmp_path):
    for index, colour in enumerate((RED, GREEN, BLUE)):
        colour_image(colour).save(tmp_path / f"{index}.png")
    rows = [
        {"q": "Compare <image> with <image>.", "a": "equal", "img": ["0.png", "1.png"]},
        {"q": "One.", "a": "x", "img": "2.png"},
    ]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = benchmarks.load_local_benchmark(
        tmp_path / "mine.jsonl", question_column="q", answer_column="a", image_column="img"
    )
    assert [len(images) for images in loaded["images"]] == [2, 1]
    assert [_pixel(loaded[0], 0), _pixel(loaded[0], 1)] == [RED, GREEN]
    assert [p["type"] for p in loaded[0]["prompt"][-1]["content"]] == ["text", "image", "text", "image", "text"]
    assert loaded["id"] == ["0", "1"] and loaded["options"] == [None, None]


def test_local_file_column_options_and_multiple_choice(tmp_path):
    colour_image(RED).save(tmp_path / "a.png")
    row = {"uid": "q7", "problem": "Pick.", "gold": "B", "pic": "a.png", "choices": "A. cat; B. dog"}
    (tmp_path / "set.jsonl").write_text(json.dumps(row))
    loaded = benchmarks.load_local_benchmark(
        tmp_path / "set.jsonl",
        question_column="problem",
        answer_column="gold",
        image_column="pic",
        id_column="uid",
        options_column="choices",
    )
    assert loaded["id"] == ["q7"] and loaded["options"] == [["cat", "dog"]]
    scores = accuracy_reward([r"\boxed{dog}", r"\boxed{B}", r"\boxed{cat}"], ["B"] * 3, options=[["cat", "dog"]] * 3)
    assert scores == [1.0, 1.0, 0.0]


def test_loaded_options_drive_scoring(copies):
    row = benchmarks.load_benchmark("mathvista", path=copies / "mathvista")[0]
    completions = [r"\boxed{B}", r"\boxed{145^\circ}", r"\boxed{(B) 145°}", r"\boxed{A}", r"\boxed{165}", "B"]
    k = len(completions)
    assert accuracy_reward(completions, [row["solution"]] * k, options=[row["options"]] * k) == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Choices:\n(A) 145°\n(B) 165°", ["145°", "165°"]),
        ("Find it. Choices:\nA:145°\nB:165°\nC:175°", ["145°", "165°", "175°"]),
        ("A. 2; B. 3; C. No correct answer", ["2", "3", "No correct answer"]),
        ("Which? (A) Point A. (B) Point B.", ["Point A.", "Point B."]),
        ("What is x?", []),
        ("Only (A) here", []),
    ],
)
def test_parse_inline_options(text, expected):
    assert benchmark_schemas.parse_inline_options(text) == expected


def test_unknown_benchmark_name_is_named():
    with pytest.raises(ValueError, match="unknown benchmark.*'mathvsta'.*valid names"):
        benchmarks.check_benchmark_names(["mathvista", "mathvsta"])
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        benchmarks.load_benchmark("nope")


def test_missing_image_file_is_named(tmp_path):
    (tmp_path / "set.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "gone.png"}))
    with pytest.raises(ValueError, match=r"benchmark 'set'.*row 0.*gone\.png.*missing_image"):
        benchmarks.load_local_benchmark(tmp_path / "set.jsonl")


def test_empty_split_and_missing_copy_are_named(tmp_path):
    write_parquet(tmp_path / "mathvision" / "data" / "testmini-0.parquet", {"id": [], "question": []})
    with pytest.raises(ValueError, match="benchmark 'mathvision'.*has no rows"):
        benchmarks.load_benchmark("mathvision", path=tmp_path / "mathvision")
    with pytest.raises(FileNotFoundError, match="No parquet file for split 'test'"):
        benchmarks.load_benchmark("geometry3k", path=tmp_path / "mathvision")
    with pytest.raises(FileNotFoundError, match="local path .*absent does not exist"):
        benchmarks.load_benchmark("wemath", path=tmp_path / "absent")
    with pytest.raises(ValueError, match="logicvista.*--benchmark_paths logicvista="):
        benchmarks.load_benchmark("logicvista")


def test_duplicate_ids_are_refused(tmp_path):
    colour_image(RED).save(tmp_path / "a.png")
    rows = [{"id": "same", "question": "q", "answer": "1", "image": "a.png"}] * 2
    (tmp_path / "dup.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="duplicate ids \\['same'\\]"):
        benchmarks.load_local_benchmark(tmp_path / "dup.jsonl", id_column="id")


def test_max_samples_takes_the_first_rows(copies):
    loaded = benchmarks.load_benchmark("dynamath", path=copies / "dynamath", max_samples=3)
    assert loaded["id"] == ["1-v1", "2-v1", "1-v2"]
