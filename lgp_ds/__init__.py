"""lgp_ds: Layer Grafted Pre-training of Vision Transformers on DeepSpeed."""
__version__ = "0.1.0"
