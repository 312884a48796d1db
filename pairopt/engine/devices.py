"""Which device a command runs on, and whether a backend can run there (checked up front).

`pairopt bench` and `pairopt verify` resolve their --device option here, before anything is
built, so a bad value is one PairoptError naming the option, not a traceback from deep in torch.
"""

from __future__ import annotations

import torch

from pairopt.errors import PairoptError


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """A device that exists here ("auto": cuda if available, else cpu), or a PairoptError.

    Shared by `pairopt bench` and `pairopt verify`.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise PairoptError(
            f"{option} {name!r}: not a device torch knows. Use cpu, cuda or cuda:N."
        ) from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PairoptError(f"{option} {name}: no CUDA device here. Use {option} cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PairoptError(
                f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise PairoptError(
            f"{option} {name}: no {device.type} device in this torch build. Use {option} cpu"
            f"{' or cuda' if torch.cuda.is_available() else ''}."
        )
    return device


def check_flex_device(device: torch.device, option: str) -> None:
    """backend='flex' only on CUDA: on the CPU FlexAttention has no backward and torch's inductor
    CPU template fails to compile for some head sizes (a CppCompileError deep in torch)."""
    if device.type != "cuda":
        where = "the CPU" if device.type == "cpu" else device.type
        raise PairoptError(
            f"{option} flex: backend='flex' needs a CUDA device on this build (on {where} it "
            "has no backward and torch's inductor kernel for it fails to compile): use sdpa, "
            f"eager or varlen on {where}."
        )
