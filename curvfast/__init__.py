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
