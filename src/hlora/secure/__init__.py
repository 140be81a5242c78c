"""Secure aggregation: the server learns only sums of the clients' contributions (`two_stage`: HLoRA's
product mean from two rounds of secure sums)."""
