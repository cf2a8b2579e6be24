"""Each benchmark script runs at tiny size (--smoke) and prints well-formed JSON lines.

No timing is asserted: only that every line parses, the machine record comes first, each
figure carries its keys with finite numbers, and the properties the scripts check hold
(no recompilation after the first step, donated state, the same weights on both sides).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = {"cpu", "cores", "jax", "jaxlib", "backend", "device_kind", "date", "loadavg"}
EXPECTED = {  # script: (figure kind, keys every figure of that kind has, number of figures)
    "train_step.py": ("train_step", {"tokens_per_s", "model_tflops", "peak_tflops", "mfu", "step_s",
                                     "compiles_after_first_step", "donated", "model_flops_per_step"}, 1),
    "moe_layer.py": ("moe_layer", {"dispatch", "what", "moe_s", "ideal_mlp_s", "ratio", "devices"}, 4),
    "attention.py": ("attention", {"name", "what", "seconds", "sdpa_s", "ratio"}, 10),
    "vs_transformers.py": ("vs_transformers", {"what", "precision", "operands", "moe_jax_s", "torch_s", "ratio",
                                               "logits_max_abs_diff"}, 6),
    "fp8_gemm.py": ("fp8_gemm", {"shape", "what", "fp8_ms", "fp8_quant_ms", "fp8_xla_ms", "bf16_ms", "fp8_tflops",
                                 "bf16_tflops", "fp8_vs_bf16", "rel_err", "rel_diff_xla"}, 6),
    "flash_gpu.py": ("flash_check", {"tensor", "pallas_gpu_rel_err", "einsum_bf16_rel_err", "ok"}, 6),
}


def run_script(script: str, *args: str):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 forced devices stay here
  env["JAX_PLATFORMS"] = "cpu"
  if script != "fp8_gemm.py":  # a smoke run times nothing: compile fast (conftest.py). fp8_gemm's
    # kernel-vs-XLA bound (rel_diff_xla < 1e-5) holds at full optimization (measured 1.6e-5 at level 0)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], env=env,
                        capture_output=True, text=True, timeout=900, check=False)


def run_smoke(script: str, *extra: str) -> list[dict]:
  """The script's --smoke output as records (pytest -n spreads the scripts over its workers)."""
  out = run_script(script, "--smoke", *extra)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def finite_numbers(rec: dict) -> bool:
  return all(math.isfinite(v) for v in rec.values() if isinstance(v, float))


EXTRA_KINDS = {"vs_transformers.py": {"matmul_peaks", "precision_loss"}, "flash_gpu.py": {"flash_time"}}  # records besides the figures


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_smoke_prints_json_figures(script):
  if script == "vs_transformers.py" and not HAVE_TORCH:
    pytest.skip("torch and transformers are not installed")
  records = run_smoke(script)
  assert records[0]["kind"] == "machine" and MACHINE <= set(records[0])
  kind, keys, count = EXPECTED[script]
  figures = [r for r in records[1:] if r["kind"] == kind]
  others = {r["kind"] for r in records[1:] if r["kind"] != kind}
  assert len(figures) == count and others == EXTRA_KINDS.get(script, set()), records
  for rec in figures:
    assert keys <= set(rec), (keys - set(rec), rec)
    assert finite_numbers(rec), rec
  if script == "train_step.py":
    assert figures[0]["compiles_after_first_step"] == 0 and figures[0]["donated"] is True
  if script == "moe_layer.py":
    assert {(r["dispatch"], r["what"]) for r in figures} == {
        (d, w) for d in ("ragged", "ep") for w in ("forward", "forward_backward")}
    assert [r["devices"] for r in figures if r["dispatch"] == "ep"] == [2, 2]
  if script == "fp8_gemm.py":  # the fused kernel (interpreted) agrees with fp8.py's XLA form
    assert {(r["shape"], r["what"]) for r in figures} == {
        (s, w) for s in ("dense", "grouped") for w in ("forward", "dgrad", "wgrad")}
    assert all(r["rel_diff_xla"] < 1e-5 and 0 < r["rel_err"] < 0.06 for r in figures), figures
  if script == "flash_gpu.py":  # the interpreted kernel within bf16's own error, every path timed
    assert all(r["ok"] for r in figures), figures
    assert {r["path"] for r in records if r["kind"] == "flash_time"} == {
        "pallas_gpu_packed", "einsum_packed", "cudnn_packed", "cudnn_causal"}
  if script == "vs_transformers.py":
    assert {(r["what"], r["precision"]) for r in figures} == {
        (w, p) for w in ("forward", "train", "user") for p in ("default", "float32")}
    assert figures[0]["logits_max_abs_diff"] < 1e-4  # the same weights on both sides
    extra = {r["kind"]: r for r in records if r["kind"] in ("matmul_peaks", "precision_loss")}
    assert finite_numbers(extra["matmul_peaks"]) and extra["precision_loss"]["rel_diff"] < 0.01


def test_train_step_with_router_training_on_the_corpus():
  """--router_steps trains on the embedded corpus first and reports the expert-load imbalance."""
  records = run_smoke("train_step.py", "--router_steps", "2", "--no_document_mask")
  kinds = [r["kind"] for r in records]
  assert kinds == ["machine", "router_training", "train_step"], kinds
  step = records[-1]
  assert step["router_steps"] == 2 and step["data"] == "embedded corpus" and step["document_mask"] is False
  assert step["load_imbalance"] >= 1.0 and records[1]["load_imbalance_random_init"] >= 1.0
  assert step["compiles_after_first_step"] == 0


def test_gmm_gpu_says_it_needs_a_hopper_gpu():
  out = run_script("gmm_gpu.py")
  assert out.returncode != 0 and "needs a Hopper GPU" in out.stderr and "Traceback" not in out.stderr
