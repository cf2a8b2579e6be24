"""Forces 8 host CPU devices before jax is imported, so sharding tests run anywhere."""

import os
import tempfile

# Backend optimization level 0: XLA:CPU's LLVM code generation is most of a tiny model's compile
# time, and the tests run few steps (measured: a tiny train step compiles in half the time and
# runs 2x slower; fp32 results differ in the last bits, as FMA contraction does).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Exact fp32 matmuls, here and in the commands tests start (moe_jax/layers/matmul.py: at JAX's
# default precision a CPU with AMX computes fp32 matmuls from bf16 operands).
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
# One persistent compilation cache for every test process (both xdist workers and the commands
# tests start): many tests build a Trainer or a model whose step is the same program as another
# test's, and compiling dominates a tiny model's test. A program compiles once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "moe_jax_tests_jax_cache"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
