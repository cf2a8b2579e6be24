"""Compile-only inference steps for a TPU topology: `python -m moe_jax.aot --step=eval|generate`.

  eval      the scoring step eval.py runs (moe_jax/scoring.py `_score`): forward + log-softmax
            over [B, S] -> per-row sums, greedy flags and per-token log p.
  generate  the two programs moe_jax/generate.py runs: prefill (the prompt [B, S] into a fresh MLA
            latent cache with room for S + 1 tokens, expanded attention, first token) and ONE decode
            step (absorbed MLA against that cache, the cache donated), each compiled on its own.
            --speculative=K: moe_jax/speculative.py's instead: prefill (main and MTP latent caches
            with room for S + K + 2 tokens, first token, K drafts) and ONE loop step (verify K + 1
            positions in one absorbed call, accept, draft K with the MTP depths; the loop state donated).

B defaults to one sequence per data shard (data x fsdp x expert), S to the config's seq_len.
The model is the config's, dropless (as eval and generation run it: model.dropless), with
param_dtype = its compute dtype (eval.py loads weights in the compute dtype). --weights=fp8 (the
default 'auto' picks it for DeepSeek-V3, whose released weights are FP8) keeps what the released
checkpoint holds in FP8 as e4m3 parameters with fp32 128x128 block scales (the `fp8_scales`
collection, as hf.load_pretrained(keep_fp8=True) builds them: every linear weight but the
embedding, the output head and the router gate; the rare block that does not map onto our
layout stays in the compute dtype). The matmuls run in the compute dtype, each FP8 weight
dequantized as it is used (layers/fp8.py `dense`): TPU v5p and v6e have no FP8 matmul unit,
and libtpu (0.0.42 here) aborts on the FP8 blocked ragged_dot of model.fp8=True (a check in
its ragged-dot lowering), so FP8 compute stays opt-in (--set model.fp8=True) and untried here.

Nothing runs eagerly: variables, cache and batch are ShapeDtypeStructs carrying their shardings
(from the rules table; the cache and the batch shard their batch dimension over the batch
axes, scales follow their weight's layer/expert dimensions), and each program is only lowered
and compiled. Figures are per chip, from XLA's memory analysis (the program's arguments, outputs
not aliased to a donated argument, and its temp allocation) against the chip's HBM.
"""

from __future__ import annotations

import functools
import time
from typing import Any

STEPS = ("train", "eval", "generate")
WEIGHTS = ("auto", "fp8", "dense")  # dense: every weight in the compute dtype


def inference_config(config, weights: str):
  """-> (ModelConfig for eval/generation, whether its released weights are kept in FP8)."""
  from moe_jax import checkpoint
  from moe_jax.config import dropless
  from moe_jax.errors import UserError
  if weights not in WEIGHTS:
    raise UserError(f"--weights={weights!r} is not one of {', '.join(WEIGHTS)}")
  mcfg = checkpoint.model_config(config)
  v3 = mcfg.scoring_func == "sigmoid"  # DeepSeek-V3 (released in FP8); V2 / V2-Lite are bf16
  fp8 = weights == "fp8" or (weights == "auto" and v3)
  return dropless(mcfg).replace(param_dtype=mcfg.dtype), fp8


@functools.lru_cache(maxsize=None)
def _fp8_slot_shapes(rule_kind: str, hf_shape: tuple, slot_shapes: tuple) -> tuple | None:
  """Scale shapes [(Rb, Cb)] per slot of a released FP8 tensor (hf.Rule.to_ours_fp8 traced, nothing read),
  or None when its blocks do not map onto our layout."""
  import jax
  import jax.numpy as jnp
  from moe_jax import hf
  rule = hf.Rule("x", rule_kind, ())
  scale_shape = tuple(-(-n // b) for n, b in zip(hf_shape, hf.FP8_BLOCK))
  out = []

  def trace(q, s):
    kept = rule.to_ours_fp8(q, s, [tuple(x) for x in slot_shapes])
    out.append(kept is not None)
    return [sc for _, sc in kept] if kept is not None else []
  shapes = jax.eval_shape(trace, jax.ShapeDtypeStruct(hf_shape, jnp.float8_e4m3fn),
                          jax.ShapeDtypeStruct(scale_shape, jnp.float32))
  return tuple(tuple(s.shape) for s in shapes) if out[0] else None


def _released_fp8(key: str, kind: str) -> bool:
  """Whether the released DeepSeek-V3 checkpoint stores this tensor in FP8 (with weight_scale_inv)."""
  if kind not in ("linear", "linear2", "kv_b"):
    return False
  return not (key.endswith("mlp.gate.weight") or key.startswith("lm_head") or "shared_head.head" in key)


def abstract_variables(model, mesh, rules, fp8: bool, batch: int) -> dict:
  """{'params', 'router'[, 'fp8_scales']} as ShapeDtypeStructs with shardings; nothing allocated."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moe_jax import hf, variables
  mcfg = model.cfg
  flat = traverse_util.flatten_dict(variables.abstract_sharded(model, (batch, 8), mesh, rules))
  shapes = dict(flat)
  if fp8:
    for rule in hf.hf_rules(mcfg, mcfg.scoring_func == "sigmoid"):
      if rule.alias or not _released_fp8(rule.key, rule.kind) or "router" in rule.parts[0][0]:
        continue
      slot_shapes = tuple(tuple(shapes[p].shape[len(index):]) for p, index in rule.parts)
      scales = _fp8_slot_shapes(rule.kind, tuple(rule.hf_shape([list(s) for s in slot_shapes])), slot_shapes)
      if scales is None:
        continue
      for (p, index), scale in zip(rule.parts, scales):
        sp = ("fp8_scales", *p[1:])
        if sp in flat:  # a stacked slot (layers, experts): one entry covers every index
          continue
        w = flat[p]
        spec = tuple(w.sharding.spec) + (None,) * (len(w.shape) - len(w.sharding.spec))
        flat[p] = jax.ShapeDtypeStruct(w.shape, jnp.float8_e4m3fn, sharding=w.sharding)
        flat[sp] = jax.ShapeDtypeStruct(shapes[p].shape[:len(index)] + scale, jnp.float32,
                                        sharding=NamedSharding(mesh, P(*spec[:len(index)])))
  return traverse_util.unflatten_dict(flat)


def _memory(compiled, hbm: int) -> dict[str, Any]:
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  gb = lambda b: float(f"{b / 1e9:.4g}")  # noqa: E731
  return {"compiled": True, "argument_gb": gb(mem.argument_size_in_bytes), "output_gb": gb(mem.output_size_in_bytes),
          "alias_gb": gb(mem.alias_size_in_bytes), "temp_gb": gb(mem.temp_size_in_bytes), "peak_gb": gb(peak),
          "fits": peak <= hbm}


def _lower_compile(fn, *args):
  """-> (compiled or None, seconds, the compiler's out-of-memory message or None). XLA refuses a
  program whose buffers exceed HBM (RESOURCE_EXHAUSTED): that is a measured "does not fit"."""
  t0 = time.perf_counter()
  try:
    compiled, oom = fn.lower(*args).compile(), None
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, oom = None, " ".join(str(e).split())[:300]
  return compiled, round(time.perf_counter() - t0, 1), oom


def _collectives(summary) -> dict[str, dict]:
  """hlo.summarize(...).collectives -> {kind: {count, gb}} for the report."""
  return {k: {"count": int(v["count"]), "gb": round(v["bytes"] / 1e9, 3)} for k, v in sorted(summary.collectives.items())}


def _then(out: dict, first, name: str, compile_second, hbm: int) -> dict[str, Any]:
  """A prefill `first` (compiled, or None when it did not fit) and, when it fits, the program
  compile_second() -> (compiled or None, seconds, oom message) compiles: memory, fits, collectives."""
  compiled, out[f"{name}_compile_s"], oom = compile_second()
  if compiled is None:
    return {**out, "prefill": _memory(first, hbm), name: _not_fitting(oom), **_not_fitting(oom)}
  out["prefill"], out[name] = _memory(first, hbm), _memory(compiled, hbm)
  out["fits"] = out["prefill"]["fits"] and out[name]["fits"]
  from moe_jax import hlo
  out[f"{name}_collectives"] = _collectives(hlo.summarize(compiled.as_text()))
  return out


def _not_fitting(oom: str) -> dict[str, Any]:
  return {"compiled": False, "fits": False, "oom": oom}


def compile_inference(config, topology, step: str, weights: str = "auto", batch: int | None = None,
                      seq: int | None = None, speculative: int = 0) -> dict[str, Any]:
  """Compiles the eval or generate programs for the topology's compile-only devices -> one JSON-able dict.
  speculative=K (generate only): the speculative programs instead (module docstring)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moe_jax import aot, flops, generate, hlo, scoring, sharding
  from moe_jax import variables as model_variables
  from moe_jax.errors import UserError
  from moe_jax.model import Transformer

  mcfg, fp8 = inference_config(config, weights)
  if speculative and step != "generate":
    raise UserError(f"--speculative={speculative} compiles the speculative generate programs: use it with "
                    f"--step=generate, not --step={step}")
  if speculative < 0:
    raise UserError(f"--speculative={speculative}: the number of draft tokens must be >= 1 (0: off)")
  if speculative and mcfg.num_nextn_predict_layers < 1:
    raise UserError(f"--speculative={speculative} drafts with the model's MTP module, and this config has "
                    f"num_nextn_predict_layers=0: compile --step=generate without --speculative")
  devices = topology.devices()
  m = config.mesh
  try:
    mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.tensor, dcn_data=m.dcn_data, dcn_fsdp=m.dcn_fsdp,
                              dcn_expert=m.dcn_expert, dcn_tensor=m.dcn_tensor, devices=devices)
    rules = sharding.mesh_rules(mesh, m.rules)
    b = batch or sharding.data_parallel_size(mesh, rules)
    sharding.validate(mcfg, b, mesh, rules, model_variables.abstract(mcfg))
  except ValueError as e:
    raise UserError(str(e)) from None
  s = seq or config.seq_len
  if s + (step == "generate") * (1 + speculative + bool(speculative)) > mcfg.max_position_embeddings:
    raise UserError(f"--seq={s} is longer than the model's max_position_embeddings={mcfg.max_position_embeddings}")
  model = Transformer(mcfg)
  hbm = aot.FAMILIES[topology.family].hbm_bytes
  variables = abstract_variables(model, mesh, rules, fp8, b)
  row = sharding.batch_sharding(mesh, 2, rules)
  ids = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, P(*row.spec[:len(shape)])))  # noqa: E731
  out: dict[str, Any] = {
      "step": step, "topology": topology.name, "libtpu": topology.libtpu_name, "num_slices": topology.num_slices,
      "chips": len(devices), "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
      "layers": mcfg.num_hidden_layers, "seq": s, "batch": b, "moe_impl": mcfg.moe_impl,
      "weights": "fp8 (e4m3 + 128x128 scales)" if fp8 else mcfg.param_dtype,
      "weights_gb_per_chip": float(f"{sum(_per_chip_bytes(x) for x in jax.tree.leaves(variables)) / 1e9:.4g}"),
      "hbm_gb": round(hbm / 1e9, 3)}
  with sharding.activation_rules(mesh, rules):
    if step == "eval":
      # scoring._score itself (jit, model static): the shardings come with the abstract arguments.
      score = jax.jit(functools.partial(scoring._score.__wrapped__, model=model))
      compiled, out["compile_s"], oom = _lower_compile(score, variables, ids(b, s), ids(b, s),
                                                       jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=row))
      if compiled is None:
        return {**out, **_not_fitting(oom)}
      out.update(_memory(compiled, hbm))
      summary = hlo.summarize(compiled.as_text())
      model_flops = flops.forward_flops_per_token(mcfg, s, with_mtp=False) * b * s / len(devices)
      out.update(compiled_flops=float(f"{summary.flops:.4g}"), model_flops=float(f"{model_flops:.4g}"),
                 collectives=_collectives(summary))
    elif speculative:
      out.update(_compile_speculative(model, variables, b, s, speculative, mesh, row, ids, hbm))
    else:
      cache_shapes = jax.eval_shape(lambda: generate.init_cache(model, b, s + 1))
      cache = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=_cache_sharding(c, b, mesh, row)),
                           cache_shapes)

      def prefill(variables, prompt_BS, lengths_B):
        c = generate.init_cache(model, b, s + 1)
        logits, c = generate._decode_call(model, variables, c, prompt_BS, None)
        return generate.sample_logits(logits[jnp.arange(b), lengths_B - 1], None), c

      def decode(variables, cache, tok_B, pos_B):
        logits, c = generate._decode_call(model, variables, cache, tok_B[:, None], pos_B[:, None], absorb=True)
        return generate.sample_logits(logits[:, 0], None), c

      cache_sh = jax.tree.map(lambda c: c.sharding, cache)
      out["cache_gb_per_chip"] = float(f"{sum(_per_chip_bytes(x) for x in jax.tree.leaves(cache)) / 1e9:.4g}")
      pre, out["prefill_compile_s"], oom = _lower_compile(
          jax.jit(prefill, out_shardings=(NamedSharding(mesh, P(*row.spec[:1])), cache_sh)),
          variables, ids(b, s), ids(b))
      if pre is None:
        return {**out, "prefill": _not_fitting(oom), **_not_fitting(oom)}
      return _then(out, pre, "decode", lambda: _lower_compile(
          jax.jit(decode, donate_argnums=(1,), out_shardings=(NamedSharding(mesh, P(*row.spec[:1])), cache_sh)),
          variables, cache, ids(b), ids(b)), hbm)
  return out


def _compile_speculative(model, variables, b: int, s: int, k: int, mesh, row, ids, hbm: int) -> dict[str, Any]:
  """moe_jax/speculative.py's two programs for one new token of room (max_new_tokens=1, so the cache
  holds S + K + 2 slots: a verify writes up to P + K): prefill (prompt [B, S] into the main and MTP
  latent caches, first token, its K drafts) and ONE loop step (verify K + 1 positions with the
  absorbed MLA, accept, draft K with the MTP depths), the loop state (cache included) donated."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moe_jax import speculative
  kw = dict(max_new_tokens=1, k=k, temperature=0.0, top_k=0, top_p=1.0, pad_id=0, absorb=True)

  def prefill(variables, prompt_BS, lengths_B):  # (constants made under the trace: the devices compile only)
    return speculative.prefill(model, variables, prompt_BS, lengths_B, jax.random.key(0),
                               stops=jnp.full((1,), -1, jnp.int32), **kw)

  def one_step(variables, state):
    return speculative.step(model, variables, state, jax.random.key(0), stops=jnp.full((1,), -1, jnp.int32), **kw)

  state_shapes = jax.eval_shape(prefill, variables, ids(b, s), ids(b))
  rows = NamedSharding(mesh, P(row.spec[0]))
  state_sh = {name: (jax.tree.map(lambda c: _cache_sharding(c, b, mesh, row), v) if name == "cache" else
                     jax.tree.map(lambda x: rows if x.ndim and x.shape[0] == b else NamedSharding(mesh, P()), v))
              for name, v in state_shapes.items()}
  state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state_shapes, state_sh)
  gb = lambda tree: float(f"{sum(_per_chip_bytes(x) for x in jax.tree.leaves(tree)) / 1e9:.4g}")  # noqa: E731
  out: dict[str, Any] = {"speculative": k, "mtp_depths_used": min(model.cfg.num_nextn_predict_layers, k),
                         "cache_slots": s + k + 2, "cache_gb_per_chip": gb(state["cache"]),
                         "state_gb_per_chip": gb(state)}
  pre, out["prefill_compile_s"], oom = _lower_compile(jax.jit(prefill, out_shardings=state_sh), variables,
                                                      ids(b, s), ids(b))
  if pre is None:
    return {**out, "prefill": _not_fitting(oom), **_not_fitting(oom)}
  return _then(out, pre, "spec_step", lambda: _lower_compile(
      jax.jit(one_step, donate_argnums=(1,), out_shardings=state_sh), variables, state), hbm)


def _per_chip_bytes(x) -> int:
  """Bytes one device holds of an abstract array with a NamedSharding (the largest shard)."""
  import math
  shard = x.sharding.shard_shape(x.shape)
  return math.prod(shard) * x.dtype.itemsize


def _cache_sharding(c, batch: int, mesh, row):
  """The decode cache [..., B, T, C] (layers first when scanned): B over the batch axes."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  lead = c.ndim - 3
  assert c.shape[lead] == batch, (c.shape, batch)
  return NamedSharding(mesh, P(*([None] * lead), row.spec[0], None, None))
