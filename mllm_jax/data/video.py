"""Built-in synthetic clips: ``num_frames`` frames of a synthetic scene in which one shape moves.

A clip is the scene kind of ``synthetic.py`` (black background, saturated shapes on a grid of cells)
in which one shape travels in a straight line from its cell to the neighbouring cell on the left,
right, above or below, at constant speed (one cell over the clip: 16 / (T - 1) pixels a frame at the
default 32 px, 2x2 grid), while the others stay still. Both cells of its path are kept free of other
shapes, so the frames differ only where the moving shape is or was.

Questions have one-word answers: ``which way does the {color} {shape} move ?`` -> left / right / up /
down, and ``what color is the moving shape ?``. Every clip is a pure function of ``(config, split,
index)``; ``train`` and ``heldout`` partition the space of clip scenes by a stable hash (as
``synthetic.py`` does for images), so a held-out clip never appears in training.

For a LLaVA-style model a clip is ``num_frames`` consecutive images: the user text holds one
``<image>`` per frame, in frame order (``clip_turns``), and each frame's features fill its own block.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.synthetic import (
    COLOR_RGB,
    DIRECTION_QUESTION,
    DIRECTIONS,
    MOVING_COLOR_QUESTION,
    SHAPE_MASKS,
    SPLITS,
    SyntheticConfig,
    _scene_split,
)

MOTION_TYPES = ("direction", "moving_color")
_STREAM = 17  # keeps clip sampling independent of the still images of the same index


def clip_grid(config: SyntheticConfig) -> int:
    """Cells per side: the still images' grid, at least 2 so the shape has somewhere to go."""
    return max(config.grid, 2)


def _sample_scene(config: SyntheticConfig, rng: np.random.Generator) -> tuple:
    """``((start_cell, direction, color_index, shape_index), ((cell, color_index, shape_index), ...))``:
    the moving shape, then the still ones sorted by cell; all (color, shape) pairs distinct."""
    g = clip_grid(config)
    start = int(rng.integers(g * g))
    row, col = divmod(start, g)
    ways = [d for d, (dc, dr) in DIRECTIONS.items() if 0 <= col + dc < g and 0 <= row + dr < g]
    direction = ways[int(rng.integers(len(ways)))]
    dc, dr = DIRECTIONS[direction]
    end = (row + dr) * g + col + dc
    most = min(config.max_shapes - 1, g * g - 2)  # the path takes two cells
    n_still = int(rng.integers(min(config.min_shapes - 1, most), most + 1))
    free = [c for c in range(g * g) if c not in (start, end)]
    cells = rng.choice(free, size=n_still, replace=False)
    n_shapes = len(config.shapes)
    pairs = rng.choice(len(config.colors) * n_shapes, size=n_still + 1, replace=False)
    moving = (start, direction, int(pairs[0]) // n_shapes, int(pairs[0]) % n_shapes)
    still = sorted(
        (int(c), int(p) // n_shapes, int(p) % n_shapes) for c, p in zip(cells, pairs[1:], strict=True)
    )
    return moving, tuple(still)


def _render(config: SyntheticConfig, scene: tuple) -> tuple[np.ndarray, list[dict], dict]:
    size, g, t = config.image_size, clip_grid(config), config.num_frames
    cell = size / g
    radius = 0.375 * cell  # as synthetic.py: 3/4 of a cell
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    background = np.empty((size, size, 3), np.uint8)
    background[...] = np.asarray(config.background, np.uint8)
    objects = []
    for c, ci, si in scene[1]:
        row, col = divmod(c, g)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        color, shape = config.colors[ci], config.shapes[si]
        background[SHAPE_MASKS[shape](yy, xx, cx, cy, radius)] = COLOR_RGB[color]
        objects.append({"color": color, "shape": shape, "cx": cx, "cy": cy})
    start, direction, ci, si = scene[0]
    row, col = divmod(start, g)
    dc, dr = DIRECTIONS[direction]
    color, shape = config.colors[ci], config.shapes[si]
    frames = np.repeat(background[None], t, axis=0)
    path = []
    for k in range(t):
        f = k / (t - 1)  # one cell over the clip
        cx, cy = (col + 0.5 + f * dc) * cell, (row + 0.5 + f * dr) * cell
        frames[k][SHAPE_MASKS[shape](yy, xx, cx, cy, radius)] = COLOR_RGB[color]
        path.append((cx, cy))
    moving = {"color": color, "shape": shape, "direction": direction, "path": path}
    return frames, objects, moving


def make_clip(config: SyntheticConfig, split: str, index: int) -> dict:
    """The ``index``-th clip of ``split``; a pure function of its arguments.

    Returns ``{"frames": uint8[T, H, W, 3], "moving": {color, shape, direction, path: [(cx, cy)] * T},
    "objects": [{color, shape, cx, cy}] (the still shapes), "questions": [{type, question, answer}]}``
    with one question per ``MOTION_TYPES`` entry, in that order.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index, _STREAM])
    for _ in range(10_000):  # rejection-sample a scene of this split (~1/fraction tries for heldout)
        if _scene_split(("clip", scene := _sample_scene(config, rng)), config.heldout_fraction) == split:
            break
    else:
        raise ValueError(f"no {split!r} clip found: the scene space of {config} is too small to split")
    frames, objects, moving = _render(config, scene)
    questions = [
        {
            "type": "direction",
            "question": DIRECTION_QUESTION.format(color=moving["color"], shape=moving["shape"]),
            "answer": moving["direction"],
        },
        {"type": "moving_color", "question": MOVING_COLOR_QUESTION, "answer": moving["color"]},
    ]
    return {"frames": frames, "moving": moving, "objects": objects, "questions": questions}


def clip_turns(num_frames: int, question: str, answer: str | None = None) -> list[tuple[str, str]]:
    """``USER: <image> x num_frames question`` (+ the answer): one image block per frame, in order."""
    turns = [("user", " ".join([IMAGE] * num_frames + [question]))]
    return turns + [("assistant", answer)] if answer is not None else turns


def clip_record(config: SyntheticConfig, split: str, index: int, max_images: int) -> dict:
    """The synthetic ``video`` task's record: a clip's frames and one question, the types alternating."""
    if max_images < config.num_frames:
        raise ValueError(
            f"task 'video' needs max_images >= num_frames ({config.num_frames}), got {max_images}"
        )
    clip = make_clip(config, split, index)
    q = clip["questions"][index % len(MOTION_TYPES)]
    return {
        "images": list(clip["frames"]),
        "turns": clip_turns(config.num_frames, q["question"], q["answer"]),
    }


def heldout_clips(config: SyntheticConfig, n: int) -> list[dict]:
    """``n`` deterministic held-out items ``{"frames", "question", "answer", "type"}``, the question
    types alternating (``MOTION_TYPES`` order) so every prefix is balanced."""
    items = []
    for i in range(n):
        clip = make_clip(config, "heldout", i)
        items.append({"frames": clip["frames"], **clip["questions"][i % len(MOTION_TYPES)]})
    return items
