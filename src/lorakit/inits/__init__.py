"""Initializations: how a form's tensors start. See ``lorakit.inits.base.initialize``."""

from lorakit.inits.base import Init, initialize

__all__ = ["Init", "initialize"]
