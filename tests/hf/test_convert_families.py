"""`python -m mllm_jax.convert` round-trips every supported HF architecture bit for bit."""

import subprocess
import sys

import pytest
from blip2_fixtures import build_blip2, build_opt
from idefics_fixtures import IDEFICS_VARIANTS, build_idefics

from mllm_jax.families import store
from mllm_jax.hf.common import read_safetensors

BUILDERS = {
    "blip2_opt": lambda d: build_blip2(d, text="opt"),
    "instructblip_llama": lambda d: build_blip2(d, text="llama", instruct=True),
    "opt": lambda d: build_opt(d),
    "idefics": lambda d: build_idefics(d, **IDEFICS_VARIANTS[sorted(IDEFICS_VARIANTS)[0]]),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_convert_round_trip(name, tmp_path):
    src = BUILDERS[name](str(tmp_path / "src"))
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    for flags in ([f"--from_hf={src}", f"--to={ckpt}"], [f"--from={ckpt}", f"--to_hf={back}"]):
        r = subprocess.run([sys.executable, "-m", "mllm_jax.convert", *flags], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert store.read_model_config(ckpt)[0] == store.load_pretrained(src).family
    a, b = read_safetensors(src), read_safetensors(back)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
