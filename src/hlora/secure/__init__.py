"""Secure aggregation: the server learns sums of the clients' vectors and nothing else of them.

`masking` is pairwise-mask secure aggregation as SecAgg computes it (Bonawitz et al., CCS 2017), written
as the protocol's parties (clients and a server whose methods are its rounds) and run in-process by
`masking.secure_sum`; `shamir` is the threshold secret sharing that lets it survive dropouts.
`two_stage` builds HLoRA's product mean and its best rank-`r_g` factors from two such sums.
"""
