"""Serving many LoRA adapters on one base model (S-LoRA / Punica style); see bank.py and engine.py."""

from lorakit.serving.bank import AdapterBank, AdapterBankError, BankFullError
from lorakit.serving.engine import QueueFullError, Request, ServingEngine, serve_model, unserve_model
from lorakit.serving.kernels import RowPlan, batched_lora
from lorakit.serving.kv import KVCacheFullError, PagedKVCache, PagedKVPool

__all__ = ["AdapterBank", "AdapterBankError", "BankFullError", "KVCacheFullError", "PagedKVCache", "PagedKVPool",
           "QueueFullError", "Request", "RowPlan", "ServingEngine", "batched_lora", "serve_model", "unserve_model"]
