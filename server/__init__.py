"""Server side: the Flower ServerApp, strategy wrappers and the global-model aggregator (issue 3)."""
