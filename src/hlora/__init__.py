"""hlora: federated LoRA fine-tuning with heterogeneous client ranks."""

__version__ = "0.1.0"
