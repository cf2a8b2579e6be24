"""Forces 8 host CPU devices before jax is imported, so sharding tests run anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Exact fp32 matmuls, here and in the commands tests start (moe_jax/layers/matmul.py: at JAX's
# default precision a CPU with AMX computes fp32 matmuls from bf16 operands).
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
