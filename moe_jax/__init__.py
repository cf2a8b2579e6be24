"""moe_jax: DeepSeek-V3 architecture (MLA + DeepSeekMoE + MTP) in JAX/Flax."""

import glob as _glob
import os as _os
import sys as _sys

# A Linux host with no accelerator device files (TPU: /dev/accel*, /dev/vfio; GPU: /dev/nvidia*, /dev/kfd)
# runs on the CPU: say so before jax is imported, so jax does not try the installed libtpu first and log
# "Unable to initialize backend 'tpu'" at every start. An explicit JAX_PLATFORMS always wins; compile-only
# TPU topologies (moe_jax.aot) still load libtpu on their own.
if ("JAX_PLATFORMS" not in _os.environ and _sys.platform == "linux"
    and not any(_glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/kfd"))):
  _os.environ["JAX_PLATFORMS"] = "cpu"

from moe_jax.config import ModelConfig, RopeScaling  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RopeScaling", "Transformer"]
