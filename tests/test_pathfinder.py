"""LRA Pathfinder generator (scripts/lra/pathfinder.py): labels against a connectivity check written here, balance,
determinism, disjoint splits, LRA's released files, and requests it must refuse."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "lra"))  # it imports scripts/lra/task_files.py, as when run from there
spec = importlib.util.spec_from_file_location("lra_pathfinder", ROOT / "scripts" / "lra" / "pathfinder.py")
pathfinder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pathfinder)

SPLITS = ("train", "validation", "test")


def components(paddles: np.ndarray, link: float) -> np.ndarray:
    """Connected components of paddles, linking two paddles when an end of one lies within `link` of an end of the
    other (the gaps between paddles closed); ignores which contour the generator says a paddle belongs to."""
    ends = paddles.reshape(-1, 2)  # paddle i owns ends 2i and 2i + 1
    near = np.linalg.norm(ends[:, None] - ends[None], axis=-1) <= link
    component = np.arange(len(paddles))
    changed = True
    while changed:  # propagate the smallest label along links until nothing changes
        owner = np.repeat(component, 2)
        linked = np.where(near, owner[None], len(paddles)).min(axis=1)
        new = np.minimum(component, linked.reshape(-1, 2).min(axis=1))
        changed = bool((new != component).any())
        component = new
    return component


def marked_paddle(paddles: np.ndarray, marker: np.ndarray) -> int:
    distances = np.linalg.norm(paddles.reshape(-1, 2) - marker, axis=-1)
    assert distances.min() < 1e-9, "a marker is not on the end of a paddle"
    return int(distances.argmin() // 2)


@pytest.mark.parametrize("contour_length, image_size", [(14, 32), (9, 32), (4, 16)])
def test_labels_agree_with_an_independent_connectivity_check(contour_length, image_size):
    geometry = pathfinder.Geometry()
    for index in range(30):
        label = index % 2
        sample = pathfinder.generate_sample(np.random.default_rng([7, index]), label, contour_length, image_size)
        component = components(sample.paddles, link=geometry.gap + 1e-6)
        first, second = (component[marked_paddle(sample.paddles, marker)] for marker in sample.markers)
        assert int(first == second) == label == sample.label
        for marked in {first, second}:  # the marked contours are whole target contours
            assert (component == marked).sum() == contour_length
        # The rendered pixels show the markers and every paddle.
        for y, x in sample.markers:
            assert sample.image[int(y), int(x)] >= 200
        for y, x in sample.paddles.mean(axis=1):
            assert sample.image[int(y), int(x)] >= 64  # its pixel's centre lies within 0.71 of the stroke
        assert sample.image.shape == (image_size, image_size) and sample.image.dtype == np.uint8


def build(output_dir: Path, *flags: str) -> Path:
    return pathfinder.main(["--output_dir", str(output_dir), *flags])


def read_splits(folder: Path) -> dict:
    data = load_dataset("parquet", data_files={split: str(folder / f"{split}.parquet") for split in SPLITS})
    return {split: data[split] for split in SPLITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("pathfinder") / "pf", "--num_samples", "80", "--seed", "3")


def test_balanced_disjoint_splits_in_the_runner_layout(built):
    info = json.loads((built / "info.json").read_text())
    assert info["task"] == "pathfinder" and info["real"] is False and info["sequence_length"] == 1024
    assert info["num_rows"] == {"train": 64, "validation": 8, "test": 8} and info["contour_length"] == 14
    splits = read_splits(built)
    images = {split: {bytes(row) for row in data["pixels"]} for split, data in splits.items()}
    for split, data in splits.items():
        assert data.column_names == ["pixels", "label"]
        assert sum(data["label"]) * 2 == len(data), f"{split} is not balanced"
        assert all(len(row) == 1024 for row in data["pixels"])
        assert len(images[split]) == len(data), f"{split} repeats an image"
    assert not images["train"] & images["validation"] and not images["train"] & images["test"]
    assert not images["validation"] & images["test"]


def test_same_seed_same_bytes_other_seed_other_images(built, tmp_path):
    # In a fresh process, as a user would run it.
    subprocess.run([sys.executable, str(ROOT / "scripts/lra/pathfinder.py"), "--output_dir", str(tmp_path / "same"),
                    "--num_samples", "80", "--seed", "3"], check=True, capture_output=True)
    build(tmp_path / "other", "--num_samples", "80", "--seed", "4")
    for name in (*(f"{split}.parquet" for split in SPLITS), "info.json"):
        assert (tmp_path / "same" / name).read_bytes() == (built / name).read_bytes()
    assert read_splits(tmp_path / "other")["test"]["pixels"] != read_splits(built)["test"]["pixels"]


def write_lra_release(folder: Path, count: int = 20) -> dict[bytes, int]:
    """LRA's layout: metadata/N.npy text lines `imgs/N sample_K.png K label ...` and 32 x 32 grey PNGs."""
    from PIL import Image

    (folder / "metadata").mkdir(parents=True)
    (folder / "imgs" / "0").mkdir(parents=True)
    rng, lines, labels = np.random.default_rng(0), [], {}
    for index in range(count):
        image = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
        Image.fromarray(image).save(folder / "imgs" / "0" / f"sample_{index}.png")
        lines.append(f"imgs/0 sample_{index}.png {index} {index % 2} 14 1.8")
        labels[bytes(image.reshape(-1))] = index % 2
    (folder / "imgs" / "0" / "sample_99.png").write_bytes(b"")  # LRA's release has empty images: skipped
    lines.append("imgs/0 sample_99.png 99 1 14 1.8")
    (folder / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
    return labels


def test_lra_release_files_are_read_with_their_labels(tmp_path):
    labels = write_lra_release(tmp_path / "release")
    output = build(tmp_path / "pf", "--lra_dir", str(tmp_path / "release"))
    info = json.loads((output / "info.json").read_text())
    assert info["real"] is True and info["num_rows"] == {"train": 16, "validation": 2, "test": 2}
    rows = [(bytes(pixels), label) for data in read_splits(output).values()
            for pixels, label in zip(data["pixels"], data["label"], strict=True)]
    assert dict(rows) == labels
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no metadata"):
        build(tmp_path / "pf-empty", "--lra_dir", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="--image_size 32"):
        build(tmp_path / "pf-16", "--lra_dir", str(tmp_path / "release"), "--image_size", "16")


def test_bad_requests_get_a_clear_error_and_leave_nothing(built, tmp_path):
    before = sorted(path.name for path in built.iterdir())
    with pytest.raises(SystemExit, match="--overwrite"):
        build(built, "--num_samples", "80")
    assert sorted(path.name for path in built.iterdir()) == before
    with pytest.raises(SystemExit, match="cannot fit in a 32 x 32 image .* smaller --contour_length"):
        build(tmp_path / "long", "--contour_length", "30")
    with pytest.raises(SystemExit, match="Pass --num_samples 20 or more"):
        build(tmp_path / "few", "--num_samples", "12")
    with pytest.raises(SystemExit, match="--validation_fraction"):
        build(tmp_path / "fractions", "--validation_fraction", "0.6", "--test_fraction", "0.5")
    assert list(tmp_path.iterdir()) == []
    result = subprocess.run([sys.executable, str(ROOT / "scripts/lra/pathfinder.py"), "--output_dir",
                             str(tmp_path / "long"), "--contour_length", "30"], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "--contour_length" in result.stderr
