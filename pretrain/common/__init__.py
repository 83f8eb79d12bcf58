"""Pieces below both the engine and the objectives (neither imports the other's internals through them): the fp32
weight average that works under every ZeRO stage (``ema``), the cosine ramp (``schedule``), the distributed
environment and its collectives (``dist``) and the restricted checkpoint reader (``safe_load``)."""
