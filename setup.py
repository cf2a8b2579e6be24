from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="DeepSeek-V3 architecture (MLA, DeepSeekMoE, MTP, FP8) in JAX/Flax, from one CPU to a TPU pod",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        # torch: install the CPU build first (`pip install torch==2.13.0 --index-url
        # https://download.pytorch.org/whl/cpu`): from PyPI alone pip picks the CUDA one on Linux.
        "hf": ["torch>=2.4", "transformers>=5.0", "tokenizers>=0.20"],
        # Everything the suite exercises, so `pytest` skips nothing: parity (torch, transformers),
        # lm-eval adapter, plots, TensorBoard, and libtpu (jax[tpu]) for the compile-only TPU
        # topologies of tests/test_aot.py (no TPU needed; jax stays on the CPU).
        "test": ["pytest>=8", "pytest-xdist>=3", "torch>=2.4", "transformers>=5.0", "tokenizers>=0.20",
                 "lm-eval>=0.4.13,<0.5", "matplotlib", "tensorboardX", "jax[tpu]"],
        # Compile for TPU topologies from any host: python -m moe_jax.aot
        "tpu": ["jax[tpu]"],
        "eval": ["lm-eval>=0.4.13,<0.5", "tokenizers>=0.20"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboardX"],
    },
)
