"""The ``generate/`` axis: adapters for a new task or a new base model without (much) task data.

- :mod:`.bank`: tasks × checkpoints of one adapter structure as aligned vectors (flatten/unflatten,
  per-tensor statistics, alignment checks, storage);
- :mod:`.base`: the :class:`Generator` interface and its one folder format;
- condition providers (:mod:`.conditions`) and the generators of the catalog's ``generate`` axis.
"""

from lorakit.generate.bank import BankError, BankLayout, BankTask, CheckpointBank
from lorakit.generate.base import Generator, GeneratorError, load_generator

__all__ = ["BankError", "BankLayout", "BankTask", "CheckpointBank", "Generator", "GeneratorError", "load_generator"]
