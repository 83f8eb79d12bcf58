"""Pieces below both the engine and the objectives (neither imports the other's internals through them): the fp32
weight average that works under every ZeRO stage (``ema``) and the cosine ramp (``schedule``)."""
