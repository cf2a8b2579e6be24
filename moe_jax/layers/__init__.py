"""Reusable Flax modules: MLA, Router, MoE, MLP, RMSNorm, rotary embeddings."""

from moe_jax.layers.common import MLP, RMSNorm
from moe_jax.layers.mla import MLA
from moe_jax.layers.moe import MoE
from moe_jax.layers.router import Router

__all__ = ["MLA", "MLP", "MoE", "RMSNorm", "Router"]
