"""The README's module-reuse example, run as written: MLA and the DeepSeekMoE layer inside a Flax
model of your own, trained with optax."""

# --- README snippet (begin) ---
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from moe_jax import ModelConfig
from moe_jax.layers import MLA, MoE


class MyBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions):
    x = x + MLA(self.cfg)(nn.RMSNorm()(x), positions)  # multi-head latent attention, causal
    return x + MoE(self.cfg)(nn.RMSNorm()(x))  # shared + routed experts


class MyModel(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size)(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return nn.Dense(self.cfg.vocab_size)(MyBlock(self.cfg)(x, positions))


cfg = ModelConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, aux_loss_alpha=1e-3)
model = MyModel(cfg)
tokens = jax.random.randint(jax.random.key(0), (4, 33), 0, cfg.vocab_size)
variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:, :-1]))  # plain arrays
params, router = variables["params"], variables["router"]  # the router bias is not trained
tx = optax.adamw(3e-3)
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state, tokens):
  def loss_fn(params):
    logits, state = model.apply({"params": params, "router": router}, tokens[:, :-1],
                                mutable=["losses", "intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss + sum(jax.tree.leaves(state["losses"]))  # + the sown balance loss
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss
# --- README snippet (end) ---


def test_reuse_example_trains():
  new_params, new_state, loss = train_step(params, opt_state, tokens)
  _, _, loss_after = train_step(new_params, new_state, tokens)
  assert jnp.isfinite(loss) and loss_after < loss
  moved = jax.tree.map(lambda a, b: bool((a != b).any()), params, new_params)
  assert all(jax.tree.leaves(moved["MyBlock_0"]["MLA_0"])) and all(jax.tree.leaves(moved["MyBlock_0"]["MoE_0"]))
