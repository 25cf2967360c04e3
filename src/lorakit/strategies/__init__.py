"""Training strategies: how training treats adapters. Strategies stack through hook points."""

from lorakit.strategies.base import Strategy

__all__ = ["Strategy"]
