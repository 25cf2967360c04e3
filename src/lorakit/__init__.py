"""lorakit: one toolkit for the whole life of LoRA adapters, PEFT-format compatible.

Typical use::

    import lorakit
    model = lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 8, "alpha": 16}))
    ...train...
    lorakit.save(model, "out/")            # loads in peft.PeftModel.from_pretrained
    lorakit.load(other_model, "out/")
"""

from lorakit.api import apply_state, attach, extract_state, load, save
from lorakit.core.caps import Cap
from lorakit.core.context import AdapterContext, mixing, use_context
from lorakit.core.inject import (
    active_adapters,
    delete,
    disabled,
    find_targets,
    mark_trainable,
    merge,
    mixed_batch,
    set_active,
    specs,
    unload,
    unmerge,
)
from lorakit.core.registry import UnknownMethodError, entries
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterFileError, AdapterState, BaseMismatchError
from lorakit.io.peft import load_state, save_state

__version__ = "0.1.0"


def methods(axis: str | None = None) -> list:
    """Catalog entries (axis, name, target, paper, arXiv)."""
    return entries(axis)


__all__ = [
    "AdapterContext", "AdapterFileError", "AdapterSpec", "AdapterState", "BaseMismatchError", "Cap",
    "UnknownMethodError",
    "active_adapters", "apply_state", "attach", "delete", "disabled", "extract_state", "find_targets",
    "load", "load_state", "mark_trainable", "merge", "methods", "mixed_batch", "mixing", "save", "save_state",
    "set_active", "specs", "unload", "unmerge", "use_context",
]
