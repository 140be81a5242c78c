"""Aggregation: the pure math on tensors (`products`) and one small module per method.

`aggregate_products(factors, weights, rank)` is HLoRA's core (METHOD.md rule 3), usable without any
model. Importing this package registers every method with `registry`.
"""

from hlora.aggregation import fedit  # noqa: F401  (registers the method)
from hlora.aggregation.base import Aggregator, ClientPlan, ClientUpdate
from hlora.aggregation.products import aggregate_products

__all__ = ["Aggregator", "ClientPlan", "ClientUpdate", "aggregate_products"]
