"""fedrec: privacy-preserving federated recommendation."""

__version__ = "0.1.0"
