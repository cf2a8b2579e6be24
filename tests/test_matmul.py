"""layers/matmul.py: which operand dtype each precision setting gives, and the bf16-operand /
fp32-accumulation path against products of the rounded operands computed in float64.

conftest pins jax_default_matmul_precision='highest' (exact fp32); the fast path is reached here
with jax.default_matmul_precision('bfloat16') (any CPU) or by declaring the CPU to have AMX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import config as mcfg
from moe_jax.layers import gmm, matmul
from moe_jax.model import Transformer

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)


def _rounded(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("precision, amx, want", [
    ("highest", True, F32), ("float32", True, F32), ("bfloat16", False, BF16), ("BF16_BF16_F32", False, BF16),
    (None, True, BF16), (None, False, F32), ("default", True, BF16), ("default", False, F32)])
def test_operand_dtype_follows_the_precision_setting(monkeypatch, precision, amx, want):
  monkeypatch.setattr(matmul, "cpu_has_amx_bf16", lambda: amx)
  with jax.default_matmul_precision(precision):
    assert matmul.operand_dtype(jnp.float32) == want
    assert matmul.operand_dtype(jnp.bfloat16) == BF16  # half precision is never widened
    assert matmul.accumulates_apart(jnp.float32) == (want == BF16)
    assert matmul.accumulates_apart(jnp.bfloat16)  # bf16 compute accumulates in fp32 on the CPU


@pytest.mark.parametrize("equation, x_shape, y_shape", [
    ("bsd,dq->bsq", (2, 5, 16), (16, 12)),
    ("...d,dgf->...gf", (2, 5, 16), (16, 2, 8)),
    ("bshv,hvd->bsd", (2, 5, 3, 4), (3, 4, 16)),
    ("bshj,bthj->bhst", (2, 5, 3, 6), (2, 7, 3, 6)),
    ("bhst,bthv->bshv", (2, 3, 5, 7), (2, 7, 3, 4)),
])
def test_bf16_operands_fp32_accumulation_forward_and_gradients(equation, x_shape, y_shape):
  kx, ky, kg = jax.random.split(jax.random.key(0), 3)
  x, y = jax.random.normal(kx, x_shape), jax.random.normal(ky, y_shape)
  with jax.default_matmul_precision("bfloat16"):
    out, pullback = jax.vjp(lambda x, y: matmul.einsum(equation, x, y, jnp.float32), x, y)
    g = jax.random.normal(kg, out.shape)
    dx, dy = pullback(g)
  assert out.dtype == dx.dtype == dy.dtype == F32  # gradients stay fp32 (not rounded to bf16)
  xr, yr, gr = _rounded(x), _rounded(y), _rounded(g)
  ins, outs = equation.replace("...", "AB").split("->")  # numpy sums no ellipsis away
  a, b = ins.split(",")
  np.testing.assert_allclose(out, np.einsum(f"{a},{b}->{outs}", xr, yr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, np.einsum(f"{outs},{b}->{a}", gr, yr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dy, np.einsum(f"{a},{outs}->{b}", xr, gr), rtol=1e-5, atol=1e-5)
  # and it is not the exact fp32 product: the operands were rounded
  assert np.abs(np.asarray(out) - np.einsum(f"{a},{b}->{outs}", np.asarray(x, np.float64), np.asarray(y, np.float64))).max() > 1e-4


def test_exact_precision_is_plain_fp32():
  x, y = jax.random.normal(jax.random.key(1), (4, 8)), jax.random.normal(jax.random.key(2), (8, 3))
  out = matmul.einsum("td,df->tf", x, y, jnp.float32)  # conftest: 'highest'
  np.testing.assert_allclose(out, np.asarray(x, np.float64) @ np.asarray(y, np.float64), rtol=1e-6, atol=1e-6)


def test_an_index_summed_within_one_operand_is_refused():
  with jax.default_matmul_precision("bfloat16"), pytest.raises(ValueError, match="sums or repeats"):
    matmul.einsum("td,dk->t", jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.float32)


def test_tiled_grouped_swiglu_in_bf16_operands_matches_rounded_reference():
  m, d, f, e = 70, 16, 8, 3
  ks = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(ks[0], (m, d))
  gate, up = jax.random.normal(ks[1], (e, d, f)), jax.random.normal(ks[2], (e, d, f))
  down = jax.random.normal(ks[3], (e, f, d))
  sizes = jnp.array([30, 0, 40], jnp.int32)
  r = jax.random.normal(ks[4], (m, d))

  def loss(x, gate, up, down, impl):
    return jnp.sum(gmm.grouped_swiglu(x, sizes, gate, up, down, impl=impl) * r)

  with jax.default_matmul_precision("bfloat16"):
    fast = jax.grad(loss, argnums=(0, 1, 2, 3))(x, gate, up, down, "tiled")
  exact = jax.grad(loss, argnums=(0, 1, 2, 3))(x, gate, up, down, "ragged_dot")
  for a, b in zip(fast, exact):
    assert a.dtype == F32
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a - b).max()) < 3e-2 * scale  # bf16 operands: ~3 significant digits
    assert float(jnp.abs(a - b).max()) > 0  # the fast path did round


CONFIGS = {
    "v3": dict(),
    "v2_softmax_no_q_lora": dict(scoring_func="softmax", topk_method="greedy", q_lora_rank=None, n_group=1,
                                 topk_group=1, moe_impl="capacity"),
    "scan_remat_mtp": dict(scan_layers=True, remat_policy="full", num_nextn_predict_layers=1, first_k_dense_replace=0),
    "dense_reference": dict(moe_impl="dense"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_runs_on_the_fast_path_and_tracks_fp32(name):
  """Every product of the model compiles and runs with bf16 operands (XLA:CPU fails at run time on
  a bf16 dot it cannot give to its fast kernels), and the loss and gradients stay near fp32."""
  cfg = mcfg.tiny(**CONFIGS[name])
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, cfg.vocab_size)
  variables = model.init(jax.random.key(5), tokens[:, :-1])

  def loss(params):
    out = model.apply({**variables, "params": params}, tokens[:, :-1])
    logits = out[0] if isinstance(out, tuple) else out
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()

  step = jax.jit(jax.value_and_grad(loss))
  exact_loss, exact_grads = step(variables["params"])
  with jax.default_matmul_precision("bfloat16"):
    fast_loss, fast_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert abs(float(fast_loss) - float(exact_loss)) < 0.01 * abs(float(exact_loss))
  norm = lambda t: float(optax.tree.norm(t))  # noqa: E731
  assert norm(jax.tree.map(jnp.subtract, fast_grads, exact_grads)) < 0.05 * norm(exact_grads)
  assert fast_loss != exact_loss  # the fast path was taken


def test_commands_name_the_precision_flag_when_xla_cannot_run_a_bf16_dot(capsys):
  from moe_jax import errors

  @errors.main_guard
  def main(message):
    raise jax.errors.JaxRuntimeError(message)

  assert main("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32") == 2
  assert "JAX_DEFAULT_MATMUL_PRECISION=float32" in capsys.readouterr().err
  with pytest.raises(jax.errors.JaxRuntimeError):  # any other runtime failure still raises
    main("INTERNAL: something else")
