"""curvfast: remove memorized data from transformers by editing weights in the K-FAC
eigenbasis of the loss curvature (Merullo et al., 2025).

Pipeline: model + data --collect_factors--> FactorSet --eigendecompose--> EigenSet
--edit_model--> edited weights --evaluate--> recitation / perplexity.
"""
__version__ = "0.1.0"


def build_info() -> dict:
    """Facts recorded when the extension was built (torch/CUDA versions, archs)."""
    try:
        from curvfast._build_info import BUILD_INFO
    except ImportError:
        return {"built": False}
    return dict(BUILD_INFO, built=True)


from curvfast.collect import Factors, FactorSet, NonFiniteError, collect_factors  # noqa: E402
from curvfast.edit import EditResult, edit_model, edit_weight, svd_truncate  # noqa: E402
from curvfast.eigen import EigenSet, eigendecompose, eigh, eigh_batched  # noqa: E402
from curvfast.keepset import keep_counts  # noqa: E402
from curvfast.modules import resolve_modules  # noqa: E402
from curvfast.store import StoreError, load_eigen, load_factors, save_eigen, save_factors  # noqa: E402

__all__ = [
    "collect_factors", "Factors", "FactorSet", "NonFiniteError",
    "eigh", "eigh_batched", "eigendecompose", "EigenSet",
    "keep_counts", "edit_weight", "edit_model", "svd_truncate", "EditResult",
    "save_factors", "load_factors", "save_eigen", "load_eigen", "StoreError",
    "resolve_modules", "build_info", "__version__",
]
