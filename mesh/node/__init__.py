"""The node: the asyncio composition root and the shell pieces it wires (links, discovery, liveness, loading).

See specs/architecture.md for what this layer may import."""
