"""Op replacement and fusion: batch-norm folding, QKV and attention fusion, activations. Importing registers them."""
from fxopt.passes.fusion import fold_bn, fuse_qkv, attention, activations  # noqa: F401

__all__ = ['fold_bn', 'fuse_qkv', 'attention', 'activations']
