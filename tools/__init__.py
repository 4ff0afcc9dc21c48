"""Developer tools: README generation (API reference, NAT matrix, benchmarks)."""
