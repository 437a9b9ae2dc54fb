"""DataConfig: weighted mix components, one-line errors naming the key, survival through ml_collections."""

from __future__ import annotations

import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from mllm_jax.data.config import DataConfig

MIX = ({"weight": 0.5, "task": "caption"}, {"weight": 0.5, "task": "interleaved", "size": 7})


def test_components_inherit_from_the_parent():
    parent = DataConfig(max_length=48, max_images=3, text_length=5, mix=MIX)
    (w0, c0), (w1, c1) = parent.components()
    assert (w0, w1) == (0.5, 0.5)
    assert (c0.task, c1.task, c1.size, c0.size) == ("caption", "interleaved", 7, parent.size)
    for c in (c0, c1):
        assert (c.max_length, c.max_images, c.text_length, c.mix) == (48, 3, 5, ())
    assert DataConfig().components() == ((1.0, DataConfig()),)


@pytest.mark.parametrize(
    "mix, message",
    [
        (
            ({"weight": 1.0, "tsak": "vqa"},),
            r"data\.mix\[0\]\.tsak is not a data config key; did you mean 'task'",
        ),
        (({"weight": 1.0}, {"weight": 0.0}), r"data\.mix\[1\]\.weight must be a positive number, got 0\.0"),
        (({"weight": -1, "task": "vqa"},), r"data\.mix\[0\]\.weight"),
        (({"task": "vqa"},), r"data\.mix\[0\]\.weight must be a positive number, got None"),
        (({"weight": 1, "max_length": 9},), r"data\.mix\[0\]\.max_length: set it on the parent"),
        (({"weight": 1}, {"weight": 1, "task": "detect"}), r"data\.mix\[1\]\.task must be one of"),
        (({"weight": 1, "source": "mmc4"},), r"data\.mix\[0\]\.path is empty"),
        (("vqa",), r"data\.mix\[0\] must be a dict"),
    ],
)
def test_bad_mix_names_the_key(mix, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(mix=mix)


def test_bad_values_name_the_key():
    for kwargs, message in [
        (dict(source="laion"), "data.source must be one of"),
        (dict(task="interleaved"), "data.task 'interleaved' needs max_images >= 2"),
        (dict(max_skipped_fraction=1.5), "data.max_skipped_fraction must be in"),
        (dict(text_length=-1), "data.text_length is out of range"),
    ]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            DataConfig(**kwargs)


def test_mix_survives_config_files_and_overrides(tmp_path):
    path = tmp_path / "mixed.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from mllm_jax.training import presets

            def get_config():
                c = presets.base()
                c.stages.align = presets.stage(data=presets.data(max_images=2, mix={MIX!r}))
                return c
            """
        )
    )
    argv = ["prog", f"--config={path}", "--config.stages.align.data.max_length=40", "--config.seed=3"]
    values = flags.FlagValues()  # as mllm_jax.main parses its command line, on a private flag set
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    data = values.config.to_dict()["stages"]["align"]["data"]
    config = DataConfig(**data)
    assert config.mix == MIX and config.max_length == 40
    assert [c.task for _, c in config.components()] == ["caption", "interleaved"]
