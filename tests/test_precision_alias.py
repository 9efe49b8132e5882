"""`--precision fp32|bf16`: the alias of the dtype setting (train.dtype for `train`, --dtype for
`generate` and `convert`)."""
import argparse

import pytest

from deepwish import cli
from deepwish.train import loop


def _train_args(*argv):
    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    return p.parse_args(list(argv))


def test_train_precision_sets_train_dtype():
    assert loop.config_from_args(_train_args("--preset", "qwen3_tiny")).train.dtype == "bf16"  # the default
    assert loop.config_from_args(_train_args("--preset", "qwen3_tiny", "--precision", "fp32")).train.dtype == "fp32"
    # --set is applied last, as for every other shortcut
    args = _train_args("--preset", "qwen3_tiny", "--precision", "fp32", "--set", "train.dtype=bf16")
    assert loop.config_from_args(args).train.dtype == "bf16"
    with pytest.raises(SystemExit):
        _train_args("--preset", "qwen3_tiny", "--precision", "fp16")


@pytest.mark.parametrize("add,base", [(cli._add_generate, ["--hf", "x"]), (cli._add_convert, ["ck", "out"])])
def test_generate_and_convert_precision_is_dtype(add, base):
    p = argparse.ArgumentParser()
    add(p)
    assert p.parse_args(base + ["--precision", "fp32"]).dtype == "fp32"
    assert p.parse_args(base + ["--dtype", "bf16"]).dtype == "bf16"
