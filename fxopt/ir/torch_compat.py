"""What fxopt needs to smooth over between the torch versions it supports (2.13 and 2.14).

``torch.export`` warns about its *own* use of deprecated pytree internals (``LeafSpec`` on
2.13, ``treespec.children_specs`` on 2.14) while it captures, decomposes and serializes. Those
warnings are torch's business, not the user's: a user who runs with warnings as errors must
not see a capture fail over them. :func:`torch_internals` silences exactly those, around the
torch calls fxopt makes.

    >>> import warnings
    >>> from fxopt.ir.torch_compat import torch_internals
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error")
    ...     with torch_internals():
    ...         warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

__all__ = ["torch_internals"]

#: torch's own deprecation messages seen inside torch.export on the supported versions
_TORCH_INTERNAL = r"(?s).*(treespec|LeafSpec|TreeSpec|_unsafe_view|torch\.export\.dynamic_dim).*"


@contextlib.contextmanager
def torch_internals() -> Iterator[None]:
    """Silence torch's warnings about its own deprecated internals inside the block (nothing else)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_INTERNAL, category=FutureWarning)
        warnings.filterwarnings("ignore", message=_TORCH_INTERNAL, category=DeprecationWarning)
        yield
