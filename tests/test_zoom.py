"""The zoom environment (`cppo_trl.data.zoom_tool`, `cppo_trl.data.zoom_task`): TRL reads its tool schema, crops are the right pixels of the original
image, clamped, enlarged with the aspect kept, bad boxes answer an error the model sees, and the zoom task is
deterministic, answerable from the crop and not from the whole image at the miniature's pixel budget."""

import inspect
import io
import math

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.utils import get_json_schema

from cppo_trl.data import zoom_task as zoom
from cppo_trl.data.loaders import load_local
from cppo_trl.data.script_args import CPPOScriptArguments
from cppo_trl.data.zoom_task import make_zoom_dataset, make_zoom_splits, measure_detail_visibility, write_zoom_file
from cppo_trl.data.zoom_tool import ENVIRONMENTS, RelativeZoomEnvironment, ZoomEnvironment, get_environment


SUFFIX = " Answer with \\boxed{}."


def gradient(width: int = 300, height: int = 200) -> Image.Image:
    """Every pixel distinct: a crop is identified by its values."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x % 256, y % 256, (x // 256) * 100 + (y // 256) * 50], -1).astype(np.uint8))


def env_with(image, cls=ZoomEnvironment):
    environment = cls()
    assert environment.reset(prompt=[], images=[image], solution="x") is None  # the prompt already shows the image
    return environment


@pytest.mark.parametrize("cls", [ZoomEnvironment, RelativeZoomEnvironment])
def test_trl_reads_one_tool_with_its_schema(cls):
    # TRL's discovery (GRPOTrainer.__init__): public functions of the class except reset / get_reward.
    tools = [
        name
        for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]
    assert tools == ["zoom_in"]
    schema = get_json_schema(cls().zoom_in)["function"]
    assert schema["name"] == "zoom_in" and schema["description"]
    parameter = schema["parameters"]["properties"]["bbox_2d"]
    assert parameter["type"] == "array" and parameter["items"] == {"type": "integer"}
    assert schema["parameters"]["required"] == ["bbox_2d"]
    assert ("0-1000" in parameter["description"]) == (cls is RelativeZoomEnvironment)
    assert get_environment("zoom") is ZoomEnvironment and set(ENVIRONMENTS) == {"zoom", "zoom_relative"}


def test_a_large_crop_is_the_original_pixels():
    image = gradient()
    environment = env_with(image)
    crop_part, text_part = environment.zoom_in([10, 20, 160, 150])
    assert crop_part["type"] == "image" and text_part == {"type": "text", "text": "Zoom on [10, 20, 160, 150]."}
    assert np.array_equal(np.asarray(crop_part["image"]), np.asarray(image)[20:150, 10:160])  # no resize at >= 112


def test_a_small_crop_is_enlarged_with_its_aspect():
    environment = env_with(gradient())
    crop = environment.zoom_in([100, 50, 140, 70])[0]["image"]  # 40 x 20
    assert crop.size == (224, 112)  # short side 112, aspect 2:1 kept
    back = np.asarray(crop.resize((40, 20), Image.Resampling.BOX), dtype=float)
    assert np.abs(back - np.asarray(gradient())[50:70, 100:140]).mean() < 3


def test_boxes_are_clamped_to_the_image():
    image = gradient(100, 80)
    environment = env_with(image)
    crop_part, text_part = environment.zoom_in([-50, -10, 30, 2000])
    assert text_part["text"] == "Zoom on [0, 0, 30, 80]."
    small = np.asarray(image)[0:80, 0:30]
    assert crop_part["image"].size == (112, round(80 * 112 / 30))
    back = np.asarray(crop_part["image"].resize((30, 80), Image.Resampling.BOX), dtype=float)
    assert np.abs(back - small).mean() < 3
    # Fractional coordinates cover every pixel they touch.
    assert environment._crop([10.5, 10.2, 20.1, 20.9])[0].size == (11, 11)


def test_relative_boxes_are_on_a_0_1000_grid():
    image = gradient(400, 300)
    crop, text = env_with(image, RelativeZoomEnvironment).zoom_in([500, 0, 1000, 1000])
    assert np.array_equal(np.asarray(crop["image"]), np.asarray(image)[:, 200:400])
    assert text["text"] == "Zoom on [500, 0, 1000, 1000]."


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([10, 10, 10, 50], "is empty"),
        ([60, 10, 20, 50], "is empty"),  # x2 < x1: not silently swapped
        ([400, 300, 500, 350], "is empty"),  # entirely outside the 300 x 200 image
        ([10, 10, 50], "must be four numbers"),
        ("[10, 10, 50, 50]", "must be four numbers"),
        ([10, 10, "a", 50], "must be four numbers"),
        ([True, 0, 50, 50], "must be four numbers"),
        ([0, 0, math.nan, 50], "must be four numbers"),
        ([0, 0, 300, 1], "too thin"),
    ],
)
def test_bad_boxes_answer_an_error_the_model_sees(box, message):
    environment = env_with(gradient())
    result = environment.zoom_in(box)
    assert isinstance(result, str) and result.startswith("Error:") and message in result
    assert (environment.num_calls, environment.num_errors) == (1, 1)


def test_reset_keeps_the_original_resolution_and_forgets_the_last_row():
    environment = ZoomEnvironment()
    environment.reset(image=Image.new("L", (900, 700)))  # `image` column, any mode
    assert environment._images[0].size == (900, 700) and environment._images[0].mode == "RGB"
    environment.zoom_in([0, 0, 10, 10])
    environment.reset(prompt=[{"role": "user", "content": "no image"}])
    assert (
        environment.num_calls == 0 and environment.zoom_in([0, 0, 10, 10]) == "Error: there is no image to zoom into."
    )


def test_zoom_task_is_deterministic_and_answerable_from_the_crop():
    first, again = make_zoom_dataset(6, seed=3), make_zoom_dataset(6, seed=3)
    other = make_zoom_dataset(6, seed=4)
    assert first["solution"] == again["solution"] and first["prompt"] == again["prompt"]
    assert [np.asarray(r["images"][0]).tobytes() for r in first] == [
        np.asarray(r["images"][0]).tobytes() for r in again
    ]
    assert [np.asarray(r["images"][0]).tobytes() for r in first] != [
        np.asarray(r["images"][0]).tobytes() for r in other
    ]
    for row in first:
        image = row["images"][0]
        assert image.size == (zoom.ZOOM_IMAGE_SIZE, zoom.ZOOM_IMAGE_SIZE)
        assert f"the {row['region']} quarter" in row["prompt"][-1]["content"][-1]["text"]
        x1, y1, x2, y2 = row["answer_cell"]
        pixels = np.asarray(image)[y1:y2, x1:x2].reshape(-1, 3)
        assert (pixels == zoom.ZOOM_COLORS[row["solution"]]).all()
        environment = env_with(image)
        crop = environment.zoom_in(row["zoom_box"])[0]["image"]
        assert zoom._cell_colour(np.asarray(crop, dtype=float), row["answer_cell"], row["zoom_box"]) == row["solution"]
    splits = make_zoom_splits(6, 3, seed=3)
    assert splits["train"]["solution"] == first["solution"] and len(splits["test"]) == 3
    assert set(splits["test"]["question"]) <= {zoom._QUESTION.format(region=r) for r in zoom.ZOOM_REGIONS}


def test_the_detail_vanishes_at_the_budget_but_not_in_the_zoom(tiny_vlm):
    processor = AutoProcessor.from_pretrained(tiny_vlm("qwen3_vl"))  # 128 x 128 px at most, as the miniature
    found = measure_detail_visibility(processor, num_samples=3)
    assert found["full_processed_size"] == [128, 128] and found["zoom_processed_size"] == [128, 128]
    assert found["full_answer_contrast"] < 15 and found["full_decoder_accuracy"] <= 0.5
    assert found["zoom_answer_contrast"] > 200 and found["zoom_decoder_accuracy"] == 1.0


def test_processed_pixels_are_the_processors_resize(tiny_vlm):
    processor = AutoProcessor.from_pretrained(tiny_vlm("qwen3_vl"))
    image = gradient(300, 200)
    pixels = zoom.processed_pixels(image, processor)
    width, height = pixels.shape[1], pixels.shape[0]
    expected = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(pixels - expected).max() < 1.0  # Qwen2-VL's processor resizes with PIL bicubic


def test_a_written_split_loads_back_through_the_training_scripts_file_loader(tmp_path):
    dataset = make_zoom_dataset(3, seed=5, prompt_suffix=SUFFIX)
    loaded = load_local(write_zoom_file(dataset, tmp_path / "train.parquet"), prompt_suffix=SUFFIX)
    assert loaded["prompt"] == dataset["prompt"] and loaded["solution"] == dataset["solution"]
    for original, back in zip(dataset, loaded, strict=True):
        assert np.array_equal(np.asarray(original["images"][0]), np.asarray(back["images"][0]))
    buffer = io.BytesIO()
    dataset[0]["images"][0].save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 50_000  # flat images: the parquet stays small


def test_the_script_argument_names_an_environment():
    assert CPPOScriptArguments().environment is None
    assert CPPOScriptArguments(environment="zoom").environment == "zoom"
    with pytest.raises(ValueError, match="environment must be one of"):
        CPPOScriptArguments(environment="browser")


# --- DeepEyes's verl rows (the recipe's dataset), in the schema read from its code (docs/agents.md)
def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _deepeyes_row(question, answer, source, image, *, with_extra_question=True):
    instruction = (
        "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
        "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
    )
    extra = {"index": 0, "answer": f"The answer is {answer}."}
    if with_extra_question:
        extra["question"] = question
    return {
        "data_source": source,
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant.\n\n# Tools\n<tools>...</tools>"},
            {"role": "user", "content": "<image>\n" + question + instruction},
        ],
        "images": [{"bytes": image, "path": None}],
        "ability": "qa",
        "env_name": "visual_toolbox_v2",
        "reward_model": {"ground_truth": answer, "style": "model"},
        "extra_info": extra,
    }


def test_deepeyes_rows_become_prompt_images_solution(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cppo_trl.data.loaders import DEEPEYES_TOOL_FILES, load_deepeyes
    from cppo_trl.data.splits import load_split

    folder = tmp_path / "DeepEyes-Datasets-47k"
    folder.mkdir()
    vstar = [
        _deepeyes_row("What is the color of the umbrella?", "red", "vstar", _png("red")),
        _deepeyes_row("Is the cup left of the plate?", "yes", "vstar", _png("blue"), with_extra_question=False),
        _deepeyes_row("Broken image?", "no", "vstar", b"not a png"),
    ]
    chart = [_deepeyes_row("What is the value in 2019?", "42", "chart", _png("white"))]
    for name, rows in zip(DEEPEYES_TOOL_FILES, (vstar, chart), strict=True):
        pq.write_table(pa.Table.from_pylist(rows), folder / name)

    loaded = load_split(CPPOScriptArguments(dataset_name=str(folder), prompt_suffix=SUFFIX), "train", seed=0)
    assert loaded["solution"] == ["red", "yes", "42"]  # the broken image is skipped, not fatal
    assert loaded["data_source"] == ["vstar", "vstar", "chart"] and set(loaded["env_name"]) == {"visual_toolbox_v2"}
    assert loaded["source_file"] == [DEEPEYES_TOOL_FILES[0]] * 2 + [DEEPEYES_TOOL_FILES[1]]
    first, fallback = loaded[0]["prompt"], loaded[1]["prompt"]
    assert first == [
        {
            "role": "user",
            "content": [
                {"type": "image", "text": None},
                {"type": "text", "text": "What is the color of the umbrella?" + SUFFIX},
            ],
        }
    ]  # DeepEyes's system text (TRL renders the tool) and its <answer> instruction are gone
    assert fallback[0]["content"][-1]["text"] == "Is the cup left of the plate?" + SUFFIX
    assert loaded[0]["images"][0].size == (64, 48)
    one_file = load_deepeyes(folder / DEEPEYES_TOOL_FILES[1], prompt_suffix=SUFFIX)
    assert one_file["solution"] == ["42"]
    with pytest.raises(ValueError, match="single 'train' split"):
        load_deepeyes(folder, split="test")
