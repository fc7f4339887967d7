"""One check for `--device` everywhere: the spelling, and that the device exists on this machine."""
from __future__ import annotations

import re

from typing import TYPE_CHECKING

from saeforge.errors import UserError

if TYPE_CHECKING:
    import torch

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """`cpu`, `cuda`, `cuda:N` or `mps`; anything else is one clear line."""
    if not _DEVICE.match(device):
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps")
    return device


def torch_device(device: str) -> "torch.device":
    """The torch.device for `device`, refusing a CUDA/MPS device this machine does not have."""
    import torch
    check_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} but no CUDA device is available here; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use cuda:0…cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available here; use --device cpu")
    return torch.device(device)
