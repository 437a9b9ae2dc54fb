"""The docs name only what exists: every ``python -m mllm_jax.<prog>`` in README.md and docs/*.md is a
program, every ``--flag`` given to it is one of its flags, every ``--config=FILE:PRESET[,MODIFIER]``
loads, and every ``config.*`` key (an override or a mention) is a key of some config. Flags are read
from the programs themselves (their absl definitions, recorded while the module runs); config keys
from every preset and modifier of every config file, and every trainable family's model settings.

A code block that shows an ``error:`` line documents a mistake on purpose; its unknown names are not
offences. Placeholders (``<name>``, ``KEY``, ``...``) match anything."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import importlib.util
import os
import re
from unittest import mock

import absl.flags
import absl.flags._defines
import ml_collections
import pytest

from mllm_jax import families, schema
from mllm_jax.errors import ConfigError
from mllm_jax.training import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's own flags, accepted by every program
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok", "logtostderr",
              "alsologtostderr", "v", "verbosity", "log_dir", "stderrthreshold", "only_check_args",
              "pdb", "pdb_post_mortem", "run_with_pdb", "run_with_profiling", "use_cprofile_for_profiling",
              "showprefixforinfo", "logger_levels"}  # fmt: skip

PROG = re.compile(r"python3? -m mllm_jax\.([\w.]+)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w.\-]*)(=\S*)?")
CONFIG_KEY = re.compile(r"(?<![\w./\-])config\.([A-Za-z_<][\w.<>]*)")
CONFIG_SPEC = re.compile(r"^(configs/[\w]+\.py)(?::(\S+))?$")
END_OF_COMMAND = re.compile(r"&&|\|\||;|\s\|\s|\s#|`")
FILE_SUFFIXES = {"json", "py", "yaml", "jsonl"}  # config.json, config.py: files, not keys


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of a doc: a logical line of a code block, or a paragraph of prose (its first line)."""

    text: str
    line: int
    shows_error: bool  # in a code block that prints an ``error:`` line


def segments(text: str) -> list[Segment]:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                block.append((i + 1, lines[i]))
                i += 1
            shows_error = any(line.strip().startswith("error:") for _, line in block)
            joined, first = "", None
            for n, line in block:  # continuation lines (trailing backslash) make one command
                first = first or n
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                out.append(Segment(joined + line, first, shows_error))
                joined, first = "", None
            if joined:
                out.append(Segment(joined, first, shows_error))
        elif lines[i].strip():  # a paragraph (an inline code span may cross its line breaks)
            first = i
            while i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].lstrip().startswith("```"):
                i += 1
            out.append(Segment(" ".join(lines[first : i + 1]), first + 1, False))
        i += 1
    return out


def placeholder(part: str) -> bool:
    return part.startswith("<") or part == "..." or (part.isupper() and len(part) > 1) or part == "*"


def commands(segment: Segment) -> list[tuple[str, str]]:
    """``(prog, its arguments)`` for each ``python -m mllm_jax.<prog>`` in the segment."""
    text, out = segment.text, []
    # inline code spans outside code blocks: only what is inside the backticks is a command
    pieces = re.findall(r"`([^`]+)`", text) if "```" not in text and "`" in text else [text]
    for piece in pieces:
        for m in PROG.finditer(piece):
            rest = piece[m.end() :]
            end = END_OF_COMMAND.search(rest)
            out.append((m.group(1).rstrip("."), rest[: end.start()] if end else rest))
    return out


def config_key_mentions(segment: Segment) -> list[str]:
    keys = []
    text = re.sub(r"`error:[^`]*`", "", segment.text)  # an inline error line quotes a mistake on purpose
    for m in CONFIG_KEY.finditer(text):
        key = m.group(1).rstrip(".")
        if key and key.split(".")[0] not in FILE_SUFFIXES:
            keys.append(key)
    return keys


def _record_flags(names: list[str]):
    """Patches absl's and argparse's flag definitions to record names instead of registering them."""

    def define_flag(flag, *args, **kwargs):
        names.append(flag.name)
        if isinstance(flag, absl.flags.BooleanFlag):
            names.append("no" + flag.name)
        return flag

    def add_argument(self, *option_strings, **kwargs):
        names.extend(s.lstrip("-") for s in option_strings if s.startswith("--"))

    return [
        mock.patch.object(absl.flags._defines, "DEFINE_flag", define_flag),
        mock.patch.object(absl.flags, "DEFINE_flag", define_flag),
        mock.patch.object(argparse.ArgumentParser, "add_argument", add_argument),
    ]


@functools.cache
def program_flags(prog: str) -> frozenset[str] | None:
    """The flags ``python -m mllm_jax.<prog>`` defines, or None when it is no program. The module runs
    afresh under another name (so flags defined at import are seen again) with definitions recorded."""
    path = os.path.join(ROOT, "mllm_jax", *prog.split(".")) + ".py"
    if not os.path.isfile(path):
        return None
    importlib.import_module(f"mllm_jax.{prog}")  # its imports first, so only its own flags are recorded
    names: list[str] = []
    patches = _record_flags(names)
    for p in patches:
        p.start()
    try:
        spec = importlib.util.spec_from_file_location(f"_docs_check_{prog.replace('.', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if callable(getattr(module, "define_flags", None)):  # programs that define flags when run
            module.define_flags()
    finally:
        for p in reversed(patches):
            p.stop()
    if not names or not callable(getattr(module, "main", None)):
        return None
    return frozenset(names)


def _union(tree: dict, config) -> None:
    for key, value in config.items() if hasattr(config, "items") else []:
        if isinstance(value, ml_collections.ConfigDict | dict):
            _union(tree.setdefault(key, {}), value)
        else:
            tree.setdefault(key, None)


@functools.cache
def config_tree() -> dict:
    """Every config key of every preset and modifier of configs/*.py, and every trainable family's
    model settings, as a nested dict (leaves None); ``stages["*"]`` holds the keys any stage has."""
    tree: dict = {}
    _union(tree, presets.base())
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        if os.path.basename(path).startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location("_docs_config_" + os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for preset in getattr(module, "PRESETS", {}):
            for modifier in ("", *getattr(module, "MODIFIERS", {})):
                try:
                    _union(tree, module.get_config(preset + ("," + modifier if modifier else "")))
                except ConfigError:  # a modifier made for other presets
                    continue
    for name in families.FAMILIES:
        try:
            settings = families.trainable(name).settings_cls
        except (ConfigError, KeyError, TypeError, AttributeError):
            continue  # not a trainable family
        _union(tree.setdefault("model", {}), schema.to_config_dict(settings))
    _union(tree["stages"].setdefault("*", {}), presets.stage())
    for stage in list(tree["stages"].values()):
        _union(tree["stages"]["*"], stage)
    return tree


def key_exists(key: str) -> bool:
    node = config_tree()
    for i, part in enumerate(key.split(".")):
        if node == {} or placeholder(part):  # an open map (sharding_rules) or a placeholder
            if placeholder(part) and i == 1 and key.startswith("stages."):
                node = node.get("*", {})
                continue
            return True
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@functools.cache
def spec_loads(spec: str) -> str | None:
    """None when ``--config=spec`` loads, else the one-line error."""
    m = CONFIG_SPEC.match(spec)
    if "<" in spec or "..." in spec:
        return None  # a placeholder
    if not m:
        return None if not spec.startswith("configs/") else f"not a config spec: {spec}"
    path, arg = m.groups()
    if arg and any(placeholder(p) or "[" in p for p in re.split(r"[,=]", arg)):
        return None
    try:
        presets.load(os.path.join(ROOT, path) + (":" + arg if arg else ""))
    except ConfigError as e:
        return str(e)
    return None


def offences(text: str, doc: str = "<text>") -> tuple[list[str], int]:
    """The names ``text`` uses that do not exist, as ``doc:line: ...`` lines, and how many were checked."""
    bad, checked = [], 0
    for seg in segments(text):
        where = f"{doc}:{seg.line}"
        for key in config_key_mentions(seg):
            checked += 1
            if not key_exists(key) and not seg.shows_error:
                bad.append(f"{where}: no config key config.{key}")
        for prog, args in commands(seg):
            checked += 1
            known = program_flags(prog)
            if known is None:
                bad.append(f"{where}: no program python -m mllm_jax.{prog}")
                continue
            for m in FLAG.finditer(args):
                name, value = m.group(1), (m.group(2) or "")[1:]
                checked += 1
                if name.startswith("config.") and "config" in known:
                    if not key_exists(name.removeprefix("config.").rstrip(".")) and not seg.shows_error:
                        bad.append(f"{where}: no config key {name}")
                    continue
                if name not in known and name not in ABSL_FLAGS and not placeholder(name):
                    if not seg.shows_error:
                        bad.append(f"{where}: python -m mllm_jax.{prog} has no flag --{name}")
                elif name == "config" and "config" in known and value:
                    error = spec_loads(value.strip("\"'"))
                    if error and not seg.shows_error:
                        bad.append(f"{where}: --config={value}: {error}")
    return bad, checked


def docs() -> list[str]:
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_every_command_flag_and_config_key_the_docs_name_exists():
    bad, checked = [], 0
    for path in docs():
        with open(path) as f:
            found, n = offences(f.read(), os.path.relpath(path, ROOT))
        bad += found
        checked += n
    assert checked > 300, f"only {checked} names found in the docs: the parser is broken"
    assert not bad, "the docs name what does not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("```bash\npython -m mllm_jax.predict --model=/m --prompt=hi --bogus_flag=3\n```", "--bogus_flag"),
        ("Run `python -m mllm_jax.convert --from=/a --to_hff=/b` to export.", "--to_hff"),
        (
            "```\npython -m mllm_jax.main --config=configs/llava.py:tiny --workdir=/w \\\n"
            "    --config.stages.align.stepz=3\n```",
            "config.stages.align.stepz",
        ),  # fmt: skip
        ("Set `config.eval.num_questionz` to 0.", "config.eval.num_questionz"),
        ("`python -m mllm_jax.main --config=configs/llava.py:tiny,loraa --workdir=/w`", "loraa"),
        ("`python -m mllm_jax.trian --config=configs/llava.py:tiny`", "mllm_jax.trian"),
        ("`python -m mllm_jax.plan --config=configs/llava.py:7b --target=v5p-8 --nosugest`", "--nosugest"),
    ],
)
def test_made_up_names_are_caught(text, expected):
    bad, _ = offences(text)
    assert len(bad) == 1 and expected in bad[0], bad


def test_real_names_pass_and_error_examples_are_exempt():
    good = (
        "```bash\npython -m mllm_jax.main --config=configs/llava.py:tiny,lora --workdir=/w \\\n"
        "    --config.stages.instruct.lora.rank=8 --config.mesh.fsdp=-1 --distributed=off\n"
        "python -m mllm_jax.plan --config=configs/llava.py:7b --target=v5p-8 --nosuggest --max_batch=8\n"
        "python -m mllm_jax.predict --model=/m --image=a.png --prompt=hi --num_beams=2  # comment --x\n```\n"
        "`config.stages.<name>.beta`, `config.model.use_resampler`, `config.sharding_rules.vocab`, "
        "config.json, `python -m mllm_jax.main --helpfull`, `error: unknown key config.stepz`\n"
        "```\n$ python -m mllm_jax.main --config=configs/llava.py:tiny --workdir=/x \\\n"
        "    --config.stages.align.stepz=1\n"
        "error: unknown key config.stages.align.stepz; did you mean steps?\n```\n"
    )
    bad, checked = offences(good)
    assert not bad, bad
    assert checked >= 14, checked


def github_anchors(path: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (lowercased, punctuation dropped,
    spaces as hyphens, repeats numbered)."""
    out, counts, in_code = set(), {}, False
    with open(path) as f:
        for line in f:
            if line.lstrip().startswith("```"):
                in_code = not in_code
            m = None if in_code else re.match(r"#{1,6} (.*)", line)
            if m:
                slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
                n = counts[slug] = counts.get(slug, -1) + 1
                out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_and_anchor_resolves():
    pages = [
        *docs(),
        os.path.join(ROOT, "CHANGELOG.md"),
        *glob.glob(os.path.join(ROOT, "docs", "notes", "*.md")),
    ]
    bad = []
    for page in pages:
        with open(page) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, ROOT)}: ({link})"
            if not os.path.exists(target):
                bad.append(f"{where}: no such file")
            elif anchor and target.endswith(".md") and anchor not in github_anchors(target):
                bad.append(f"{where}: no heading with that anchor")
    assert not bad, "broken links in the docs:\n" + "\n".join(bad)


def test_architecture_page_names_every_module():
    """docs/architecture.md's package tree names every module of the package."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        page = f.read()
    tree = page[page.index("## Package layout") : page.index("## Shape letters")]
    missing = []
    for path in glob.glob(os.path.join(ROOT, "mllm_jax", "**", "*.py"), recursive=True):
        name = os.path.basename(path)[:-3]
        if name != "__init__" and not re.search(rf"(?<![\w/]){re.escape(name)}(\.py)?(?!\w)", tree):
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, f"docs/architecture.md's package layout does not name {sorted(missing)}"


def test_the_pictures_are_rendered_from_the_data_beside_them():
    """docs/img's SVG curves and memory plan equal what tools/render_figures.py draws from the
    metrics.jsonl / plan JSON kept in docs/img/data (so a picture cannot drift from its numbers)."""
    spec = importlib.util.spec_from_file_location(
        "_render_figures", os.path.join(ROOT, "tools", "render_figures.py")
    )
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    data = os.path.join(ROOT, "docs", "img", "data")
    runs = [os.path.join(data, f"{name}_tiny.jsonl") for name in ("llava", "flamingo", "blip2")]
    expected = {"tiny_curves.svg": render.curves(runs, ["LLaVA tiny", "Flamingo tiny", "BLIP-2 tiny"])}
    plans = sorted(glob.glob(os.path.join(data, "plan_*.json")))
    if plans:
        expected["plan_memory.svg"] = render.plan(plans)
    for name, svg in expected.items():
        with open(os.path.join(ROOT, "docs", "img", name)) as f:
            assert f.read() == svg, f"docs/img/{name} is stale: rerun tools/render_figures.py (its docstring)"
    assert 'stroke="#1f77b4"' in expected["tiny_curves.svg"]  # the first run's line was drawn
