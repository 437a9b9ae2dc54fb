"""Train: ``python -m mllm_jax.main --config=configs/llava.py:tiny --workdir=DIR [--config.KEY=VALUE]``.

Runs every stage of ``config.stage_order``, resuming from the newest checkpoint in DIR. Config and
command-line mistakes are reported in one line with exit code 2 before anything compiles.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mllm_jax import distributed, errors, paths
from mllm_jax.training import inputs, runconfig, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/llava.py:tiny.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard events go.")
distributed.define_flags()


def _config_keys(config, prefix="config.") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _config_keys(v, f"{prefix}{k}.")
    return keys


def parse_flags(argv):
    """absl flag parsing with one-line errors (and a "did you mean" for config keys), exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        message = lines[0]
        if "Traceback" in str(e):  # the config file raised: its own last line says why (less its type)
            why = re.sub(r"^[\w.]*Error: ", "", lines[-1])
            message = f"{message.split(': Error')[0]}: {why}"
        unknown = re.search(r"flag '(--)?(config\.[\w.]+)'", message)
        if unknown and FLAGS["config"].present and FLAGS.config is not None:
            close = difflib.get_close_matches(unknown.group(2), _config_keys(FLAGS.config), n=1)
            if close:
                message += f"; did you mean {close[0]}?"
        print(f"error: {_type_error(message)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # an override naming a missing key, or the config file failed to load
        print(f"error: {_override_error(argv, e)}", file=sys.stderr)
        sys.exit(2)


TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}


def _type_error(message: str) -> str:
    """``flag --config.a.b=V: invalid literal for int() ...`` -> ``config.a.b must be an integer, got 'V'``
    (the override's type is the type of the key's value in the config file)."""
    m = re.match(r"flag --(config(?:\.\w+)+)=(.*?): (.*)", message)
    if not m or not FLAGS["config"].present or FLAGS.config is None:
        return message
    node = FLAGS.config
    for key in m.group(1).split(".")[1:]:
        if not hasattr(node, "items") or key not in node:
            return message
        node = node[key]
    if hasattr(node, "items"):
        return f"{m.group(1)} is a group of keys ({', '.join(list(node)[:4])}, ...): set those instead"
    expected = TYPE_NAMES.get(type(node), type(node).__name__)
    return f"{m.group(1)} must be {expected}, got {m.group(2)!r}"


def _override_error(argv, e: Exception) -> str:
    """ml_collections reports a missing override key as ``AttributeError('key\nDid you mean "x"')``:
    name the whole ``config.`` path and the suggestion instead."""
    text = str(e).strip("'\"").replace("\\n", "\n")
    key = re.match(r"\W*(\w+)", text)
    close = re.search(r'Did you mean "(\w+)"', text)
    for arg in argv[1:]:
        m = re.match(r"--(config(?:\.\w+)+)(=|$)", arg)
        if m and key and m.group(1).split(".")[-1] == key.group(1):
            path = m.group(1)
            hint = f"; did you mean {path.rsplit('.', 1)[0]}.{close.group(1)}?" if close else ""
            return f"unknown config key {path}{hint}"
    return f"--config: {type(e).__name__}: {text.splitlines()[0] if text else e}"


class _LibraryInfoFilter(pylogging.Filter):
    """Keep our INFO lines; drop the per-save chatter orbax, jax and grain log at INFO."""

    NOISY = ("/orbax/", "/jax/", "/jaxlib/", "/grain/", "/fsspec/", "/gcsfs/")

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def _fail(e: Exception):
    """``error: <first line>``, exit code 2: no traceback for a mistake the user can fix."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    pylogging.getLogger("absl").addFilter(_LibraryInfoFilter())
    # All loading is local: a mistyped model directory must fail, not turn into a hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.config is None or not FLAGS.workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        sys.exit(2)
    try:  # nothing below writes to the workdir or compiles a step
        distributed.start(distributed.Cluster.from_flags())  # every host runs this same command
        paths.check(FLAGS.workdir, "--workdir")
        run = runconfig.from_config_dict(FLAGS.config)
        inputs.check_inputs(run, FLAGS.workdir)
        trainer = train.Trainer(run, FLAGS.workdir)
    except (ValueError, OSError) as e:  # also what transformers raises for a directory it cannot load
        _fail(e)
    try:
        trainer.run()
    except errors.ConfigError as e:  # a checkpoint that does not fit the model (nothing restored)
        _fail(e)
    except errors.Preempted as e:
        logging.warning("%s", e)
        sys.exit(train.PREEMPTED_EXIT_CODE)
    except (errors.Diverged, errors.DataError) as e:  # the run cannot go on; its checkpoints are intact
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("done: %s", FLAGS.workdir)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
