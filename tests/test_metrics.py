"""Honest training metrics: accuracy does not count ties, and a non-finite step names its cause."""

import jax.numpy as jnp
import numpy as np

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
