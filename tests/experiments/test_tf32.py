"""`train.tf32`: on by default, configurable, and applied through the CUDA-only switches."""

from collections.abc import Iterator

import pytest
import torch

from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.distributed import set_tf32


@pytest.fixture
def restore_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_on_by_default_and_configurable() -> None:
    assert load_run_config().train.tf32 is True
    assert load_run_config(overrides=["train.tf32=false"]).train.tf32 is False
    assert load_run_config("experiments/configs/base.yaml").train.tf32 is True


@pytest.mark.usefixtures("restore_tf32")
def test_set_tf32_switches_cuda_matmuls_and_convolutions_and_says_so() -> None:
    cpu_precision = torch.backends.mkldnn.matmul.fp32_precision
    assert set_tf32(True) == "TF32 matmuls on (train.tf32=true)"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert set_tf32(False) == "TF32 matmuls off (full fp32) (train.tf32=false)"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_precision  # CPU matmuls untouched
