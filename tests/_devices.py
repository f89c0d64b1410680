"""The devices the device-parametrised tests run on: CPU always, CUDA where a device is present."""

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
