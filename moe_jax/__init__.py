"""moe_jax: DeepSeek-V3 architecture (MLA + DeepSeekMoE + MTP) in JAX/Flax."""

from moe_jax.config import ModelConfig, RopeScaling
from moe_jax.model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RopeScaling", "Transformer"]
