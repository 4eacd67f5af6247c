"""ran: Residual Attention Networks trained on Ray, tracked in MLflow."""
__version__ = "0.1.0"
