"""Federated LoRA: aggregators (FedAvg/FedIT, FLoRA, FFA-LoRA, LoRA-FAIR), update validation, DP-SGD
clients (opacus), a plain single-process loop and a Flower app (``lorakit.federated.flower``, needs
the ``lorakit[federated]`` extra). See docs/federated.md.

Importing this package never imports Flower or opacus.
"""

from lorakit.federated.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    ClientUpdate,
    GlobalState,
    lora_factors,
    module_scales,
    module_tensors,
    normalize_weights,
)
from lorakit.federated.config import FedConfig, aggregator_names
from lorakit.federated.fedavg import FedAvg, FedAvgArgs, fedavg_states
from lorakit.federated.ffa import FFA, FFAArgs, ffa_states
from lorakit.federated.flora import FLoRA, FLoRAArgs, flora_stack
from lorakit.federated.lora_fair import LoRAFAIR, LoRAFAIRArgs, lora_fair_states
from lorakit.federated.metrics import aggregation_gap, global_delta, traffic
from lorakit.federated.partition import dirichlet_partition, label_histogram
from lorakit.federated.server import RoundReport, Server
from lorakit.federated.validate import validate_update

__all__ = [
    "FFA", "AggregationError", "AggregationResult", "Aggregator", "ClientUpdate", "FFAArgs", "FedAvg",
    "FedAvgArgs", "FedConfig", "FLoRA", "FLoRAArgs", "GlobalState", "LoRAFAIR", "LoRAFAIRArgs", "RoundReport",
    "Server", "aggregation_gap", "aggregator_names", "dirichlet_partition", "fedavg_states", "ffa_states",
    "flora_stack", "global_delta", "label_histogram", "lora_factors", "lora_fair_states", "module_scales",
    "module_tensors", "normalize_weights", "traffic", "validate_update",
]
