"""monoflow: Monotone Flows (Ahn et al., NeurIPS 2022) in PyTorch."""
__version__ = "0.1.0"
