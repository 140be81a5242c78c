"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) that keeps mixed-rank aggregation
exact: each client's change measured and clipped in product space (`clipping`), the clipped changes
averaged with fixed weights and noised (`mechanism`), the privacy spent accounted (`accountant`).
README "Privacy" says what is protected and what is not."""
