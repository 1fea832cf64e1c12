#!/usr/bin/env python
"""Generate Long Range Arena's Pathfinder-32 task (Linsley et al., 2018; LRA's hardest difficulty, contour length
14), seeded, into the layout `scripts/lra/run_lra.py` reads (`{train,validation,test}.parquet` + `info.json`).

    python scripts/lra/pathfinder.py --output_dir data/lra/pathfinder                 # 20,000 images
    python scripts/lra/pathfinder.py --output_dir data/lra/pathfinder \
        --lra_dir lra_release/pathfinder32/curv_contour_length_14                       # LRA's released images

An image is 32 x 32 grey pixels on black: dashed contours made of short straight paddles, two circular markers,
and a label that says whether the two markers lie on the same contour. Like `snakes2.py` of drewlinsley/pathfinder
(written afresh here, see docs/lra.md for where it differs): two target contours of `--contour_length` paddles grow
from seeds a few pixels apart; each next paddle continues the previous one after a gap, turning by at most
pi / (2 * continuity) with weight cos(turn * continuity)^2, into space no other paddle is near; then distractor
contours of contour_length // 3 paddles (30 // that many of them, as many as fit) fill the rest. One marker sits on
the start of a target contour; the other on the end of the same contour (label 1) or of the other one (label 0).
Labels are balanced within every split. The same `--seed` gives the same bytes; samples are distinct across splits.

`--lra_dir` reads LRA's released files instead (`metadata/*.npy` text lines `imgs/N sample_K.png ... label ...` and
the PNGs), shuffles them with `--seed` and splits them 80/10/10. Everything is written under a temporary name and
renamed when complete.
"""

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from task_files import write_task  # the builders' atomic writer, shared
from tqdm.auto import tqdm

LABEL_NAMES = ["different contours", "same contour"]
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Geometry:
    """Sizes in pixels of the final image (snakes2 draws at 300 x 300 with paddles of 5, margins of 3, markers of
    radius 5, seeds 27 apart; these are chosen for 32 x 32 so that a contour of 14 paddles fits twice with room for
    distractors)."""

    paddle_length: float = 2.0
    gap: float = 1.0  # between consecutive paddles of a contour
    thickness: float = 1.0
    clearance: float = 2.0  # least distance between a paddle and any paddle other than its neighbours
    padding: float = 1.0  # paddles keep this far from the border
    seed_distance: float = 4.0  # between the first points of the two target contours
    marker_radius: float = 1.2
    continuity: float = 1.8  # snakes2's: largest turn pi / (2 * continuity) = 50 degrees
    points_per_paddle: int = 4  # where distances are measured along a paddle (its two ends included)

    def turns(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate turns between consecutive paddles and their weights, cos(turn * continuity)^2."""
        largest = math.pi / (2 * self.continuity)
        turns = np.linspace(-largest, largest, 13)[1:-1]
        return turns, np.cos(turns * self.continuity) ** 2


class PathfinderError(ValueError):
    """A request that cannot be generated; the message says what to change."""


@dataclass
class PathfinderArguments:
    output_dir: str = field(default="data/lra/pathfinder", metadata={"help": "Folder to create (must not exist)."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Images in all splits together (default: 20,000 generated, or every image of --lra_dir)."})
    contour_length: int = field(default=14, metadata={"help": "Paddles per target contour (LRA: 14, hardest)."})
    image_size: int = field(default=32, metadata={"help": "Pixels per side (LRA's Pathfinder-32: 32)."})
    seed: int = 0
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of the images for validation."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share of the images for test."})
    lra_dir: str | None = field(default=None, metadata={
        "help": "LRA's released images instead (lra_release/pathfinder32/curv_contour_length_14)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    task = "pathfinder"  # what write_task records

    def __post_init__(self):
        if self.lra_dir is None:
            self.num_samples = 20000 if self.num_samples is None else self.num_samples
            check_fits(self.contour_length, self.image_size, Geometry())
        sizes = split_sizes(self.num_samples, self.validation_fraction, self.test_fraction) \
            if self.num_samples is not None else None
        if sizes is not None and min(sizes.values()) < 2:
            need = math.ceil(2 / min(self.validation_fraction, self.test_fraction, 1 - self.validation_fraction -
                                     self.test_fraction))
            raise PathfinderError(f"--num_samples {self.num_samples} gives splits of {sizes}: every split needs at "
                                  f"least 2 images (one per class). Pass --num_samples {need} or more.")


def split_sizes(total: int, validation_fraction: float, test_fraction: float) -> dict[str, int]:
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise PathfinderError("--validation_fraction and --test_fraction must be in (0, 1) and sum to less than 1.")
    validation, test = int(total * validation_fraction), int(total * test_fraction)
    return {"train": total - validation - test, "validation": validation, "test": test}


def check_fits(contour_length: int, image_size: int, geometry: Geometry) -> None:
    """Refuse requests whose two target contours cannot fit: each paddle keeps a band of 2 x clearance around its
    step (paddle + gap) free, and the two targets may take at most half of the drawable area."""
    if contour_length < 1 or image_size < 8:
        raise PathfinderError(f"--contour_length must be >= 1 and --image_size >= 8, got {contour_length} and "
                              f"{image_size}.")
    drawable = (image_size - 2 * geometry.padding) ** 2
    per_paddle = (geometry.paddle_length + geometry.gap) * 2 * geometry.clearance
    longest = int(drawable / 2 / (2 * per_paddle))
    if contour_length > longest:
        raise PathfinderError(
            f"Two contours of {contour_length} paddles cannot fit in a {image_size} x {image_size} image (at most "
            f"{longest} paddles each): pass a smaller --contour_length (LRA: 14) or a larger --image_size "
            f"(at least {math.ceil(math.sqrt(2 * contour_length * 2 * per_paddle) + 2 * geometry.padding)}).")


# ---------------------------------------------------------------------------------------------------- drawing


@dataclass
class Sample:
    """One image, its label, and what it was drawn from: paddles as (start, end) points (y, x), the contour each
    belongs to (0 and 1 are the targets), and the markers' centres."""

    image: np.ndarray
    label: int
    paddles: np.ndarray  # (paddles, 2, 2)
    contours: np.ndarray  # (paddles,)
    markers: np.ndarray  # (2, 2)


class Canvas:
    """The paddles placed so far, and a grid (4 cells a pixel, with a margin) that counts, for every cell, the
    placed paddles within `clearance` of it: a new paddle is free where all its points fall on cells counted 0."""

    cells_per_pixel = 4

    def __init__(self, image_size: int, geometry: Geometry):
        self.size, self.geometry = image_size, geometry
        self.paddles: list[np.ndarray] = []
        self.contours: list[int] = []
        self.steps = np.linspace(0, 1, geometry.points_per_paddle)[:, None]
        self.turns, self.weights = geometry.turns()
        radius = geometry.clearance * self.cells_per_pixel
        self.margin = int(math.ceil(radius))
        self.width = image_size * self.cells_per_pixel + 2 * self.margin
        self.counts = np.zeros(self.width * self.width, dtype=np.int32)
        self.stamped = 0  # self.paddles[:stamped] are counted in the grid
        offsets = np.stack(np.mgrid[-self.margin : self.margin + 1, -self.margin : self.margin + 1], -1).reshape(-1, 2)
        disc = offsets[(offsets ** 2).sum(-1) <= radius ** 2]
        self.disc = disc[:, 0] * self.width + disc[:, 1]

    def cells(self, points: np.ndarray) -> np.ndarray:
        """Grid index of points inside the image."""
        cells = (points * self.cells_per_pixel).astype(np.intp) + self.margin
        return cells[..., 0] * self.width + cells[..., 1]

    def settle(self, count: int) -> None:
        """Count exactly the first `count` paddles in the grid."""
        while self.stamped != count:
            sign = 1 if self.stamped < count else -1
            self.stamped += min(sign, 0)
            start, end = self.paddles[self.stamped]
            around = self.cells(start + self.steps * (end - start))[:, None] + self.disc[None]
            self.counts[around] += sign  # a repeated cell changes once: each paddle counts 1 per cell
            self.stamped += max(sign, 0)

    def free(self, starts: np.ndarray, ends: np.ndarray, ignore_last: bool) -> np.ndarray:
        """Which candidate paddles lie inside the border and at least `clearance` from every placed paddle (but
        the contour's own last one, which a candidate continues), to within a grid cell."""
        self.settle(len(self.paddles) - int(ignore_last))
        points = starts[:, None] + self.steps[None] * (ends - starts)[:, None]  # (candidates, points, 2)
        low, high = self.geometry.padding, self.size - self.geometry.padding
        free = ((points >= low) & (points <= high)).all(axis=(1, 2))
        free[free] = (self.counts[self.cells(points[free])] == 0).all(axis=1)
        return free

    def add(self, start: np.ndarray, end: np.ndarray, contour: int) -> None:
        self.paddles.append(np.stack([start, end]))
        self.contours.append(contour)

    def remove_last(self) -> None:
        self.settle(min(self.stamped, len(self.paddles) - 1))
        del self.paddles[-1], self.contours[-1]

    def options(self, rng: np.random.Generator, start: np.ndarray, angle: float | None) -> tuple:
        """Candidate next paddles (angles, starts, ends) and their weights, zero where a paddle would not be free:
        from `start` in 16 random directions (a first paddle), or after a gap, turned from `angle`."""
        geometry = self.geometry
        if angle is None:
            angles = rng.uniform(-math.pi, math.pi, 16)
            starts, chance = np.repeat(start[None], len(angles), 0), np.ones(len(angles))
        else:
            angles = angle + self.turns
            starts, chance = start + geometry.gap * unit(angles), self.weights.copy()
        ends = starts + geometry.paddle_length * unit(angles)
        return angles, starts, ends, chance * self.free(starts, ends, ignore_last=angle is not None)

    def grow(self, rng: np.random.Generator, start: np.ndarray, length: int, contour: int,
             budget: int = 8) -> bool:
        """A contour of `length` paddles from `start`, by a depth-first search that draws each next paddle by
        weight and steps back from dead ends, within `budget` x `length` paddles tried; on failure nothing is
        kept."""
        kept, tried = len(self.paddles), 0
        options = [self.options(rng, start, None)]
        while options:
            angles, starts, ends, chance = options[-1]
            if chance.sum() == 0 or tried >= budget * length:
                options.pop()
                if options:
                    self.remove_last()  # the paddle drawn from the level below
                if tried >= budget * length:
                    while len(self.paddles) > kept:
                        self.remove_last()
                    return False
                continue
            choice = rng.choice(len(chance), p=chance / chance.sum())
            chance[choice], tried = 0, tried + 1
            self.add(starts[choice], ends[choice], contour)
            if len(options) == length:
                return True
            options.append(self.options(rng, ends[choice], angles[choice]))
        return False


def unit(angles: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1)


def draw_targets(rng: np.random.Generator, canvas: Canvas, contour_length: int) -> bool:
    margin = canvas.geometry.padding + canvas.geometry.seed_distance
    first = rng.uniform(margin, canvas.size - margin, 2)
    if not canvas.grow(rng, first, contour_length, 0):
        return False
    for _ in range(4):  # the second seed in another direction from the first
        second = first + canvas.geometry.seed_distance * unit(rng.uniform(-math.pi, math.pi))
        if canvas.grow(rng, second, contour_length, 1):
            return True
    return False


def render(canvas: Canvas, markers: np.ndarray) -> np.ndarray:
    """Anti-aliased strokes: a pixel's brightness falls linearly from 1 to 0 over the pixel around a stroke's edge."""
    size, geometry = canvas.size, canvas.geometry
    y, x = (coordinate.reshape(-1, 1) + 0.5 for coordinate in np.mgrid[:size, :size])  # pixel centres
    paddles = np.stack(canvas.paddles)
    start_y, start_x = paddles[None, :, 0, 0], paddles[None, :, 0, 1]
    step_y, step_x = paddles[None, :, 1, 0] - start_y, paddles[None, :, 1, 1] - start_x
    along = np.clip(((y - start_y) * step_y + (x - start_x) * step_x) / (step_y ** 2 + step_x ** 2), 0, 1)
    stroke = np.sqrt(((y - start_y - along * step_y) ** 2 + (x - start_x - along * step_x) ** 2).min(axis=1))
    dots = np.sqrt(((y - markers[None, :, 0]) ** 2 + (x - markers[None, :, 1]) ** 2).min(axis=1))
    brightness = np.maximum(np.clip(geometry.thickness / 2 + 0.5 - stroke, 0, 1),
                            np.clip(geometry.marker_radius + 0.5 - dots, 0, 1))
    return np.round(brightness * 255).astype(np.uint8).reshape(size, size)


def generate_sample(rng: np.random.Generator, label: int, contour_length: int, image_size: int = 32,
                    geometry: Geometry = Geometry(), max_attempts: int = 200) -> Sample:
    """One image with the given label (1: the markers lie on the same contour)."""
    for _ in range(max_attempts):
        canvas = Canvas(image_size, geometry)
        if draw_targets(rng, canvas, contour_length):
            break
    else:
        raise PathfinderError(f"Two contours of {contour_length} paddles did not fit a {image_size} x {image_size} "
                              f"image in {max_attempts} attempts: pass a smaller --contour_length or a larger "
                              f"--image_size.")
    distractor_length = max(contour_length // 3, 1)
    for contour in range(2, 2 + 30 // distractor_length):
        # snakes2's max_distractor_contour_retrial; a distractor that finds no room ends the distractors
        if not any(canvas.grow(rng, rng.uniform(0, image_size, 2), distractor_length, contour, budget=2)
                   for _ in range(4)):
            break
    paddles, contours = np.stack(canvas.paddles), np.array(canvas.contours)
    origin = int(rng.integers(2))
    terminal = origin if label else 1 - origin
    markers = np.stack([paddles[contours == origin][0, 0], paddles[contours == terminal][-1, 1]])
    return Sample(render(canvas, markers), label, paddles, contours, markers)


def generate(args: PathfinderArguments) -> dict[str, dict]:
    """Balanced labels per split; sample i draws from its own stream (seed, i); an image already made is drawn
    again, so no two images in the folder are equal."""
    sizes = split_sizes(args.num_samples, args.validation_fraction, args.test_fraction)
    label_rng, seen, index = np.random.default_rng(args.seed), set(), 0
    splits = {}
    with tqdm(total=args.num_samples, desc="Pathfinder images", unit="image") as progress:
        for split, size in sizes.items():
            labels = label_rng.permutation(np.arange(size) % 2)
            pixels = []
            for label in labels:
                rng = np.random.default_rng([args.seed, index])
                index += 1
                while True:
                    image = generate_sample(rng, int(label), args.contour_length, args.image_size).image
                    digest = hashlib.sha1(image.tobytes()).digest()
                    if digest not in seen:
                        break
                seen.add(digest)
                pixels.append(image.reshape(-1).tolist())
                progress.update(1)
            splits[split] = {"pixels": pixels, "label": labels.tolist()}
    return splits


# ---------------------------------------------------------------------------------------------------- LRA release


def read_lra_release(args: PathfinderArguments) -> dict[str, dict]:
    """LRA's released images: every metadata line names an image folder, a PNG and (4th field) the label."""
    from PIL import Image

    folder = Path(args.lra_dir)
    metadata = sorted((folder / "metadata").glob("*.npy"))
    if not metadata:
        raise PathfinderError(f"--lra_dir {folder} has no metadata/*.npy: pass LRA's release folder "
                              f"lra_release/pathfinder32/curv_contour_length_14.")
    rows = []
    for path in metadata:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise PathfinderError(f"{path}:{number}: expected `imgs/N sample_K.png x label ...`, found {line!r}.")
            image_path = folder / fields[0] / fields[1]
            if not image_path.is_file() or image_path.stat().st_size == 0:
                continue  # LRA's release has a few empty images; its loaders skip them too
            image = np.asarray(Image.open(image_path).convert("L"))
            if image.shape != (args.image_size, args.image_size):
                raise PathfinderError(f"{image_path} is {image.shape[1]} x {image.shape[0]}, not --image_size "
                                      f"{args.image_size}: pass --image_size {image.shape[0]}.")
            rows.append((image.reshape(-1).tolist(), int(fields[3])))
    order = np.random.default_rng(args.seed).permutation(len(rows))[: args.num_samples]
    sizes = split_sizes(len(order), args.validation_fraction, args.test_fraction)
    if min(sizes.values()) < 1:
        raise PathfinderError(f"--lra_dir {folder} holds {len(rows)} readable images, too few for three splits.")
    bounds = np.cumsum([0, *sizes.values()])
    return {split: {"pixels": [rows[i][0] for i in order[start:stop]], "label": [rows[i][1] for i in
                                                                               order[start:stop]]}
            for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)}


# ---------------------------------------------------------------------------------------------------- main


def describe(args: PathfinderArguments) -> dict:
    common = {"label_names": LABEL_NAMES, "image_size": args.image_size,
              "sequence_length": args.image_size ** 2, "contour_length": args.contour_length}
    if args.lra_dir:
        return {"source": f"LRA's released Pathfinder images ({args.lra_dir})", "real": True, **common}
    return {"source": f"scripts/lra/pathfinder.py (seed {args.seed})", "real": False,
            "substitute_for": f"LRA Pathfinder-{args.image_size} (regenerated with LRA's definition)", **common,
            "geometry": asdict(Geometry())}


def main(argv: list[str] | None = None) -> Path:
    from transformers import HfArgumentParser

    try:
        (args,) = HfArgumentParser(PathfinderArguments).parse_args_into_dataclasses(args=argv)
        return build(args)
    except PathfinderError as error:
        raise SystemExit(str(error)) from None


def build(args: PathfinderArguments) -> Path:
    if Path(args.output_dir).exists() and not args.overwrite:
        raise SystemExit(f"{args.output_dir} exists: pass --overwrite to replace it, or choose another --output_dir.")
    splits = read_lra_release(args) if args.lra_dir else generate(args)
    output_dir = write_task(splits, describe(args), args)
    counts = ", ".join(f"{len(columns['label'])} {split}" for split, columns in splits.items())
    print(f"LRA pathfinder: {describe(args)['source']}; {counts} images in {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
