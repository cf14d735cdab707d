"""The OpenAI-compatible HTTP API and the dashboard.

See specs/architecture.md for what this layer may import."""
