"""hpalign: high-throughput preference alignment on DeepSpeed."""

__version__ = "0.1.0"
