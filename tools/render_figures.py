"""Renders the docs' pictures as SVG, with the standard library only (no matplotlib).

    python tools/render_figures.py curves RUN.jsonl [RUN.jsonl ...] [--labels=A,B,C] --out=OUT.svg
    python tools/render_figures.py plan PLAN.json [PLAN.json ...] --out=OUT.svg

``curves``: one row per run, its training ``loss`` and ``accuracy`` against the global step, a dashed
line where a stage starts, and the run's evaluation headline (``eval/vqa_accuracy`` and friends)
written under the row. ``plan``: the per-chip memory of every compilation ``python -m mllm_jax.plan``
made (its JSON on stdout), split into params + optimizer state and the rest, against the chip's HBM.

docs/img/tiny_curves.svg and docs/img/plan_memory.svg were made with (inputs kept in docs/img/data/):

    cd docs/img && python ../../tools/render_figures.py curves \
        data/llava_tiny.jsonl data/flamingo_tiny.jsonl data/blip2_tiny.jsonl \
        --labels="LLaVA tiny,Flamingo tiny,BLIP-2 tiny" --out=tiny_curves.svg
    cd docs/img && python ../../tools/render_figures.py plan data/plan_*.json --out=plan_memory.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape

GIB = 2**30
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
FONT = 'font-family="Helvetica, Arial, sans-serif"'
# the evaluation fields worth a caption, in this order, when a run logged them
HEADLINES = (
    "eval/vqa_accuracy",
    "eval/vqa_accuracy_blank",
    "eval/vqa_accuracy_4shot",
    "eval/retrieval_r1",
    "eval/retrieval_r1_itm",
    "eval/itm_accuracy",
)


def _text(x, y, s, size=12, anchor="start", color="#222", weight="normal") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" {FONT} font-size="{size}" text-anchor="{anchor}" '
        f'fill="{color}" font-weight="{weight}">{escape(str(s))}</text>'
    )


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def _panel(x0, y0, w, h, xs, ys, xmax, ymax, title, starts, color) -> list[str]:
    """One line chart: axes with ticks, the series, stage starts as dashed lines."""
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="white" stroke="#999"/>']
    out.append(_text(x0 + w / 2, y0 - 6, title, 12, "middle", weight="bold"))
    for v in _ticks(0, ymax):
        y = y0 + h - v / ymax * h
        out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(_text(x0 - 4, y + 4, f"{v:.2f}" if ymax < 10 else f"{v:.0f}", 10, "end"))
    for v in _ticks(0, xmax):
        x = x0 + v / xmax * w
        out.append(_text(x, y0 + h + 13, f"{v:.0f}", 10, "middle"))
    for step, name in starts:
        x = x0 + step / xmax * w
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + h}" stroke="#888" stroke-dasharray="4 3"/>'
        )
        out.append(_text(x + 3, y0 + 12, name, 10, color="#555"))
    points = [(x0 + a / xmax * w, y0 + h - min(b, ymax) / ymax * h) for a, b in zip(xs, ys, strict=True)]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
    out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in points]
    return out


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(paths: list[str], labels: list[str]) -> str:
    """The SVG of ``curves``: a row per run, loss and accuracy side by side."""
    pw, ph, left, top, row_h = 400, 170, 60, 40, 260
    width = left + 2 * pw + 70
    out = []
    for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
        rows = read_rows(path)
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        if not train:
            raise SystemExit(f"{path}: no training rows (no 'loss' field)")
        starts, seen = [], None
        for r in train:
            if r["stage"] != seen:
                seen = r["stage"]
                starts.append((r["step"] - r.get("stage_step", r["step"]), seen))
        xmax = max(r["step"] for r in train)
        y = top + i * row_h + 20
        color = COLORS[i % len(COLORS)]
        out.append(_text(12, y - 16, label, 14, weight="bold"))
        xs = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        out += _panel(left, y, pw, ph, xs, loss, xmax, max(loss) * 1.05, "loss", starts, color)
        out += _panel(left + pw + 60, y, pw, ph, xs, [r["accuracy"] for r in train], xmax, 1.0,
                      "accuracy (answer tokens, teacher-forced)", starts, color)  # fmt: skip
        last: dict[str, float] = {}
        for r in evals:
            last.update({k: v for k, v in r.items() if k in HEADLINES})
        caption = ", ".join(f"{k.removeprefix('eval/')} {last[k]:.3f}" for k in HEADLINES if k in last)
        out.append(
            _text(
                left,
                y + ph + 32,
                f"x: global step (all stages); final evaluation: {caption}",
                11,
                color="#444",
            )
        )
    height = top + len(paths) * row_h
    return _svg(width, height, out)


PLAN_PARTS = (  # (label, colour, bytes of a trial)
    ("params + optimizer state", "#1f77b4", lambda p, t: p["state_bytes_per_chip"]),
    ("the batch (other arguments)", "#17becf", lambda p, t: t["arguments"] - p["state_bytes_per_chip"]),
    ("temporaries (activations, gradients)", "#aec7e8", lambda p, t: t["temporaries"]),
    ("outputs not aliased, code", "#c7c7c7", lambda p, t: t["outputs"] - t["aliased"] + t["generated_code"]),
)


def plan(paths: list[str]) -> str:
    """The SVG of ``plan``: one stacked bar per compiled trial (the compiler's per-chip memory analysis)
    with the chip's HBM as a red line. Trials the compiler gave up on (no breakdown) are left out."""
    bars = []
    for path in paths:
        with open(path) as f:
            p = json.load(f)
        for t in p["trials"]:
            if "arguments" not in t:
                continue
            name = (
                f"{p['config']} on {p['target']}: remat {t['remat']}, "
                f"{t['per_chip_batch']} x {p['seq_len']} tokens per chip"
            )
            parts = [(label, color, get(p, t) / GIB) for label, color, get in PLAN_PARTS]
            bars.append((name, parts, t["peak"] / GIB, p["memory_limit_bytes"] / GIB))
    if not bars:
        raise SystemExit("no trial with a memory breakdown in " + ", ".join(paths))
    left, top, bar_h, gap, w = 20, 50, 26, 46, 760
    xmax = max(max(b[2], b[3]) for b in bars) * 1.05
    out = [
        _text(
            left,
            22,
            "per-chip memory of the compiled train step (GiB), from python -m mllm_jax.plan",
            14,
            weight="bold",
        )
    ]
    for i, (name, parts, peak, limit) in enumerate(bars):
        y = top + i * (bar_h + gap)
        out.append(_text(left, y - 6, name, 12))
        x = left
        for _, color, gib in parts:
            width = gib / xmax * w
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{bar_h}" fill="{color}"/>')
            x += width
        lx = left + limit / xmax * w
        out.append(
            f'<line x1="{lx:.1f}" x2="{lx:.1f}" y1="{y - 4}" y2="{y + bar_h + 4}" '
            'stroke="#d62728" stroke-width="2"/>'
        )
        out.append(_text(lx - 4, y + bar_h + 16, f"HBM {limit:.1f}", 11, "end", color="#d62728"))
        out.append(
            _text(x + 6, y + 17, f"peak {peak:.2f} ({'fits' if peak <= limit else 'does not fit'})", 12)
        )
        out.append(
            _text(
                left,
                y + bar_h + 16,
                " · ".join(f"{label} {gib:.2f}" for label, _, gib in parts),
                10,
                color="#444",
            )
        )
    y = top + len(bars) * (bar_h + gap)
    for k, (label, color, _) in enumerate(PLAN_PARTS):
        x = left + k * 195
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{color}"/>')
        out.append(_text(x + 16, y + 10, label, 11))
    for v in _ticks(0, xmax, 5):
        out.append(_text(left + v / xmax * w, y + 32, f"{v:.0f}", 10, "middle"))
    return _svg(left + w + 40, y + 44, out)


def _svg(width, height, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="white"/>\n'
    )
    return head + "\n".join(body) + "\n</svg>\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["curves", "plan"])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--labels", default="", help="curves: a comma-separated label per run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.kind == "curves":
        labels = args.labels.split(",") if args.labels else list(args.inputs)
        if len(labels) != len(args.inputs):
            parser.error(f"{len(labels)} labels for {len(args.inputs)} runs")
        svg = curves(args.inputs, labels)
    else:
        svg = plan(args.inputs)
    with open(args.out, "w") as f:
        f.write(svg)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
