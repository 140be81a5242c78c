"""Base models, PEFT LoRA slots per rank, and moving adapter weights in and out of them."""
