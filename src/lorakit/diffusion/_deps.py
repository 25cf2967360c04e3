"""The optional ``diffusers`` dependency, imported on use with an install hint."""

from __future__ import annotations

from typing import Any


def diffusers() -> Any:
    try:
        import diffusers as d
    except ImportError as e:
        raise ImportError("lorakit.diffusion needs diffusers: pip install 'lorakit[diffusion]' (or, after torch, "
                          "pip install 'diffusers>=0.30')") from e
    return d
