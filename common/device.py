"""Where tensors run: the device a config names, bf16 autocast and channels-last on CUDA.

Pure torch. Every training, extraction and evaluation loop (sites and the centralised
reference) picks its device and precision here, so CPU and CUDA differ in one module.
"""

from __future__ import annotations

import contextlib

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device='{name}' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op on CPU (CPU autocast is slower here)."""
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """images [B, 3, H, W] on ``device`` (channels-last memory on CUDA when asked)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
