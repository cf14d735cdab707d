"""``python -m mesh gym``: distributed training algorithms simulated on modelled devices and links.

A small language model trains on a real corpus with N simulated nodes under one algorithm (a
``Strategy`` from the ``mesh.strategies`` registry); the gradient math is torch, the time is
computed from the model's FLOPs, the devices' FLOP/s and the links' bandwidth and latency, never
slept. Spec: specs/gym.md.
"""
