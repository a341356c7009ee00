"""What a compressed model costs and how well it does: measurement (parameters, bytes, MACs, latency,
generation speed, task quality) and the CompressionReport (console, W&B summary)."""
