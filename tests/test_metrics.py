"""Honest training metrics: accuracy does not count ties, and a non-finite step names its cause."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import train


def test_accuracy_counts_strict_wins_only():
  tgt = jnp.array([[0, 1, 2, 3]])
  ok = jnp.ones((1, 4), bool)
  logits = jnp.array([[[5.0, 1, 1, 1],      # target wins: correct
                       [2.0, 2, 0, 0],      # tie with another logit: wrong
                       [0.0, 0, 0, 0],      # all equal (a collapsed model): wrong
                       [0.0, 0, 0, jnp.nan]]])  # NaN: wrong
  _, correct = train.cross_entropy(logits, tgt, ok)
  assert float(correct) == 1.0  # counting ties: 3.0
  ce, _ = train.cross_entropy(logits[:, :3], tgt[:, :3], ok[:, :3])
  ref = sum(np.log(np.exp(row).sum()) - row[t] for t, row in enumerate(np.asarray(logits[0, :3])))
  np.testing.assert_allclose(float(ce), ref, rtol=1e-6)
  _, correct = train.cross_entropy(logits[:, :3], tgt[:, :3], ok[:, :3].at[0, 0].set(False))
  assert float(correct) == 0.0  # masked positions never count


def test_nonfinite_cause_names_loss_or_gradient():
  grad = train.nonfinite_cause({"loss": 7.2489, "lm_loss": 7.1, "grad_norm": float("inf")})
  assert grad.startswith("non-finite gradient (global norm inf) with a finite loss (7.2489)")
  loss = train.nonfinite_cause({"loss": float("nan"), "lm_loss": float("nan"), "grad_norm": float("nan")})
  assert loss.startswith("non-finite loss (nan")


def _reference_ce(logits, tgt, ok):
  """Plain autodiff through an fp32 upcast: what token_cross_entropy's own VJP must equal."""
  x = logits.astype(jnp.float32)
  label = jnp.take_along_axis(x, tgt[..., None], -1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(x, -1) - label) * ok)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_gradient_equals_autodiff_and_keeps_no_fp32_logits(dtype):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = (4 * jax.random.normal(k1, (3, 2, 5, 37))).astype(dtype)  # stacked [1 + K, B, S, V]
  tgt = jax.random.randint(k2, (3, 2, 5), 0, 37)
  ok = jax.random.bernoulli(k3, 0.7, (3, 2, 5))
  weights = jnp.array([1.0, 0.3, 0.3])  # the heads' loss weights, as in train.loss_fn

  def loss(lg):
    return jnp.sum(train.cross_entropy(lg, tgt, ok)[0] * weights)

  value, vjp = jax.vjp(loss, logits)
  grad, = vjp(jnp.ones((), jnp.float32))
  ref_value, ref_grad = jax.value_and_grad(lambda lg: jnp.sum(jax.vmap(_reference_ce)(lg, tgt, ok) * weights))(logits)
  assert grad.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32), atol=tol, rtol=tol)
  assert not np.asarray(grad[~ok]).any()  # masked positions get no gradient
  # What the backward keeps: the logits as they came and a per-position fp32 logsumexp, never an fp32
  # copy of the logits (a leaf of the logits' size in fp32).
  kept = [x for x in jax.tree.leaves(vjp) if hasattr(x, "dtype")]
  assert any(x.dtype == dtype and x.shape == logits.shape for x in kept)
  if dtype == jnp.bfloat16:
    assert not [x.shape for x in kept if x.dtype == jnp.float32 and x.size >= logits.size]
