"""Placement: the cost model, the solver and the pure planners (same input, same plan on every node).

See specs/architecture.md for what this layer may import."""
