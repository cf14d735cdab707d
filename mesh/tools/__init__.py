"""The CLI tools: benchmarks, reports, publishing, the plan command and the fault suite.

See specs/architecture.md for what this layer may import."""
