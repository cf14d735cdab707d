"""The request plane: the coordinator, the stage worker, KV replicas, sampling and request metrics.

See specs/architecture.md for what this layer may import."""
