"""The causal-event kernel: HLC, events, causal delivery, CRDT state, anti-entropy, the event log and its asyncio shell.

See specs/architecture.md for what this layer may import."""
