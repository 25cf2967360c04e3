"""Adapter forms: how ΔW is parameterized. One file per form; see ``lorakit.core.catalog``."""

from lorakit.forms.base import Form

__all__ = ["Form"]
