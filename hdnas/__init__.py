"""hdnas: hierarchical differentiable architecture search for lightweight super-resolution."""
__version__ = "0.1.0"
