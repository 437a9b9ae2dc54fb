"""Built-in procedural image dataset: solid colored shapes on a plain background.

Used by the ``tiny`` presets, so the visual task is deliberately easy and crisp: a few large shapes with
saturated colors, one per cell of a coarse grid (discrete positions, no overlap), and captions /
questions with one-word answers that are a deterministic function of the image.

Every example is a pure function of ``(config, split, index)``, so a data iterator only needs to checkpoint
an integer. The ``train`` and ``heldout`` splits partition the (finite) space of scenes by a stable hash,
so a held-out image is never a training image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import numpy as np

from mllm_jax.data.layouts import IMAGE

SPLITS = ("train", "heldout")
QUESTION_TYPES = ("count", "color", "shape", "position")

COLOR_RGB = {
    "red": (255, 0, 0),
    "green": (0, 220, 0),
    "blue": (40, 90, 255),  # pure (0, 0, 255) is too dark against a black background
    "yellow": (255, 255, 0),
    "purple": (170, 40, 255),
    "orange": (255, 140, 0),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CHAT_WORDS = ("USER", "ASSISTANT", ":", "?", ".", ",")

COUNT_QUESTION = "how many shapes are there ?"
COLOR_QUESTION = "what color is the {shape} ?"
SHAPE_QUESTION = "what shape is the {color} one ?"
POSITION_QUESTION = "is the {a} left or right of the {b} ?"
# grounding.py: a box's four location tokens (tasks/boxes.py) are the answer, or stand in the question
GROUNDING_QUESTION = "where is the {name} ?"
REFERRING_QUESTION = "what is at {box} ?"
# clips (video.py): direction -> (column step, row step) on the cell grid, and the motion questions
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_QUESTION = "which way does the {color} {shape} move ?"
MOVING_COLOR_QUESTION = "what color is the moving shape ?"
# existence.py: yes / no object-existence questions (POPE) and preference pairs; their words join the
# vocabulary only with ``existence_questions`` (other runs keep their tokenizer and initialisation)
EXISTENCE_QUESTION = "is there a {name} in the image ?"
EXISTENCE_ANSWERS = ("yes", "no")
# retrieval (FROMAGe's [RET], models/retrieval.py): captions that also say where each shape is, so that
# a caption names one scene; these words and [RET] join the vocabulary only with ``retrieval_captions``
RET_TOKEN = "[RET]"
CELL_ROWS = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
CELL_COLUMNS = {1: ("",), 2: ("left", "right"), 3: ("left", "center", "right")}


def _circle(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _square(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    h = 0.85 * r  # a bit smaller than the circle's bounding box so the areas are comparable
    return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)


def _triangle(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    # Upright isosceles triangle: apex at the top, base at the bottom, widening linearly.
    top, bottom = cy - r, cy + r
    t = (yy - top) / (bottom - top)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= r * t)


def _diamond(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.abs(xx - cx) + np.abs(yy - cy) <= r


SHAPE_MASKS = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 32
    min_shapes: int = 1
    max_shapes: int = 3
    colors: tuple = ("red", "green", "blue", "yellow")
    shapes: tuple = ("circle", "square", "triangle")
    background: tuple = (0, 0, 0)
    seed: int = 0
    # Share of the scene space reserved for ``heldout``; those scenes never appear in ``train``.
    heldout_fraction: float = 0.1
    num_frames: int = 4  # frames per clip of the ``video`` task (video.py)
    existence_questions: bool = False  # vocabulary: the words of EXISTENCE_QUESTION and yes / no
    retrieval_captions: bool = False  # vocabulary: the cells' words and [RET] (task "retrieval")

    def __post_init__(self):
        unknown = set(self.colors) - set(COLOR_RGB) | set(self.shapes) - set(SHAPE_MASKS)
        if unknown:
            raise ValueError(f"unknown {sorted(unknown)}; known: {sorted(COLOR_RGB)}, {sorted(SHAPE_MASKS)}")
        if not 1 <= self.min_shapes <= self.max_shapes < len(NUMBER_WORDS):
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 9: {self.min_shapes}, {self.max_shapes}")
        if self.max_shapes > len(self.colors) * len(self.shapes):
            raise ValueError("max_shapes exceeds the number of distinct (color, shape) pairs")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.retrieval_captions and self.grid not in CELL_ROWS:
            raise ValueError(
                f"retrieval_captions names cells of grids up to 3x3, not {self.grid}x{self.grid}"
            )
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (a clip shows motion), got {self.num_frames}")

    @property
    def grid(self) -> int:
        """Cells per side: the smallest square grid with a cell for every shape."""
        return math.ceil(math.sqrt(self.max_shapes))


def _scene_split(scene: tuple, fraction: float) -> str:
    # crc32 rather than hash(): stable across processes and Python versions.
    bucket = zlib.crc32(repr(scene).encode()) % 10_000
    return "heldout" if bucket < fraction * 10_000 else "train"


def _sample_scene(config: SyntheticConfig, rng: np.random.Generator) -> tuple:
    """A scene is a tuple of (cell, color_index, shape_index), sorted by cell (= reading order)."""
    g = config.grid
    n = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    cells = rng.choice(g * g, size=n, replace=False)
    pairs = rng.choice(len(config.colors) * len(config.shapes), size=n, replace=False)  # distinct pairs
    n_shapes = len(config.shapes)
    return tuple(
        sorted((int(c), int(p) // n_shapes, int(p) % n_shapes) for c, p in zip(cells, pairs, strict=True))
    )


def _render(config: SyntheticConfig, scene: tuple) -> tuple[np.ndarray, list[dict]]:
    size, g = config.image_size, config.grid
    cell = size / g
    radius = 0.375 * cell  # shapes span 3/4 of a cell: large, yet never touching a neighbour
    image = np.empty((size, size, 3), np.uint8)
    image[...] = np.asarray(config.background, np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    objects = []
    for c, ci, si in scene:
        row, col = divmod(c, g)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        color, shape = config.colors[ci], config.shapes[si]
        mask = SHAPE_MASKS[shape](yy, xx, cx, cy, radius)
        image[mask] = COLOR_RGB[color]
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)  # x1, y1 exclusive
        objects.append({"color": color, "shape": shape, "cx": cx, "cy": cy, "box": box})
    return image, objects


def caption(objects: list[dict]) -> str:
    """E.g. ``"a red circle , a green square and a blue triangle ."`` (objects in reading order)."""
    parts = [f"a {o['color']} {o['shape']}" for o in objects]
    text = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    return text + " ."


def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def questions(objects: list[dict], rng: np.random.Generator, min_dx: float) -> list[dict]:
    """One question of each type that has a unique one-word answer for these objects."""
    out = [{"type": "count", "question": COUNT_QUESTION, "answer": NUMBER_WORDS[len(objects)]}]

    shapes = [o["shape"] for o in objects]
    unique_shapes = [o for o in objects if shapes.count(o["shape"]) == 1]
    if unique_shapes:
        o = unique_shapes[int(rng.integers(len(unique_shapes)))]
        question = COLOR_QUESTION.format(shape=o["shape"])
        out.append({"type": "color", "question": question, "answer": o["color"]})

    colors = [o["color"] for o in objects]
    unique_colors = [o for o in objects if colors.count(o["color"]) == 1]
    if unique_colors:
        o = unique_colors[int(rng.integers(len(unique_colors)))]
        question = SHAPE_QUESTION.format(color=o["color"])
        out.append({"type": "shape", "question": question, "answer": o["shape"]})

    # Objects are named by their (color, shape) pair, unique within an image by construction.
    pairs = [(a, b) for a in objects for b in objects if abs(a["cx"] - b["cx"]) >= min_dx]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        out.append(
            {
                "type": "position",
                "question": POSITION_QUESTION.format(a=_name(a), b=_name(b)),
                "answer": "left" if a["cx"] < b["cx"] else "right",
            }
        )
    return out


# A few thousand distinct scenes cover the whole space at the default settings: render each once.
_render_cached = functools.lru_cache(maxsize=16384)(_render)


def make_example(config: SyntheticConfig, split: str, index: int) -> dict:
    """The ``index``-th example of ``split``; a pure function of its arguments.

    Returns ``{"image": uint8[H, W, 3], "objects": [{color, shape, cx, cy, box=(x0, y0, x1, y1)}],
    "caption": str, "questions": [{type, question, answer}]}`` with objects in reading order
    (top-to-bottom rows, left-to-right within a row).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    # Rejection-sample until the scene belongs to this split (~1/fraction tries for heldout).
    for _ in range(10_000):
        if _scene_split(scene := _sample_scene(config, rng), config.heldout_fraction) == split:
            break
    else:
        raise ValueError(f"no {split!r} scene found: the scene space of {config} is too small to split")
    image, objects = _render_cached(config, scene)
    image, objects = image.copy(), [dict(o) for o in objects]  # callers may edit; the cache must not change
    min_dx = 0.5 * config.image_size / config.grid  # shapes in the same column are neither left nor right
    return {
        "image": image,
        "objects": objects,
        "caption": caption(objects),
        "questions": questions(objects, rng, min_dx),
    }


def pick_question(questions: list[dict], qtype: str, index: int) -> dict:
    """The question of type ``qtype``, else a deterministic other one (not every image has every type)."""
    for q in questions:
        if q["type"] == qtype:
            return q
    return questions[index % len(questions)]


def vocabulary(config: SyntheticConfig) -> list[str]:
    """Every word of any caption, question or answer, plus the chat-template words; sorted."""
    templates = (COUNT_QUESTION, COLOR_QUESTION, SHAPE_QUESTION, POSITION_QUESTION, "a and , .")
    templates += (GROUNDING_QUESTION, REFERRING_QUESTION, DIRECTION_QUESTION, MOVING_COLOR_QUESTION)
    words = {w for t in templates for w in t.split() if "{" not in w}
    words.update(config.colors, config.shapes, ("left", "right"), CHAT_WORDS, DIRECTIONS)
    words.update(NUMBER_WORDS[config.min_shapes : config.max_shapes + 1])
    if config.existence_questions:
        words.update(w for w in EXISTENCE_QUESTION.split() if "{" not in w)
        words.update(EXISTENCE_ANSWERS)
    if config.retrieval_captions:
        words.update(w for w in CELL_ROWS[config.grid] + CELL_COLUMNS[config.grid] if w)
        words.add(RET_TOKEN)
    return sorted(words)


def located_caption(config: SyntheticConfig, objects: list[dict]) -> str:
    """``caption`` with each shape's cell: ``"a red circle top left and a blue square bottom right ."``;
    a scene has exactly one (retrieval among held-out images)."""
    g, cell = config.grid, config.image_size / config.grid
    rows, cols = CELL_ROWS[g], CELL_COLUMNS[g]
    where = lambda o: (rows[int(o["cy"] // cell)], cols[int(o["cx"] // cell)])  # noqa: E731
    located = [dict(o, shape=" ".join(w for w in (o["shape"], *where(o)) if w)) for o in objects]
    return caption(located)


def retrieval_record(config: SyntheticConfig, split: str, index: int, max_images: int) -> dict:
    """FROMAGe's retrieval example: the located caption, then ``[RET]`` (the answer, learned), then the
    image in a later turn, so that ``[RET]`` never sees it (causal attention); the image is the
    contrastive target of the ``[RET]`` state (models/retrieval.py) and its turn's answer is empty."""
    if not config.retrieval_captions:
        raise ValueError("task 'retrieval' needs synthetic.retrieval_captions=True (its words and [RET])")
    ex = make_example(config, split, index)
    turns = [("user", located_caption(config, ex["objects"])), ("assistant", RET_TOKEN)]
    return {"images": [ex["image"]], "turns": [*turns, ("user", IMAGE), ("assistant", "")]}
