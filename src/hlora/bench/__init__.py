"""Benchmarks of hlora's own costs, runnable from the command line (`hlora bench ...`).

| command                  | module           | what it measures                                         |
|--------------------------|------------------|----------------------------------------------------------|
| `hlora bench aggregation`| `aggregation.py` | server aggregation: HLoRA's QR path against FlexLoRA's   |
|                          |                  | dense SVD, time and peak memory, side by side            |

Results and the hardware they were measured on are in BENCHMARKS.md.
"""
