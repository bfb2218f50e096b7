"""Triton kernels of curvfast (installed as ``curvfast.kernels``)."""
from .covariance import Config, covariance_update, covariance_update_grouped, tuned_config

__all__ = ["Config", "covariance_update", "covariance_update_grouped", "tuned_config"]
