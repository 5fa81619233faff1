"""Encoding vs a training step: tokens/s and peak device memory, side by side.

  python benchmarks/bench_encoder.py --mode=all --dtype=bfloat16   # every case, each in its own process
  python benchmarks/bench_encoder.py --mode=train|none|adafactor|adam|adam_rank1
  python benchmarks/bench_encoder.py --mode=all --model=tiny --dtype=float32 --batch=2 --seq=16 --vocab=256 \
      --d=4 --steps=2                                            # CPU smoke test (tests/test_benchmarks.py)
  python benchmarks/bench_encoder.py --mode=all --arch=gemma3 --model=gemma3_1b --batch=16 --seq=256  # Gemma 3 1B

--arch=gemma3 runs the Gemma 3 architecture of google-deepmind's `gemma`
package (`gm.nn.Transformer`, random weights; needs gemma installed, see
trackstar_jax/models/gemma_lm.py): --model=gemma3_1b is Gemma3_1B's published
shape (26 layers, width 1152, 262,144-token vocabulary: ~1.0B parameters),
--model=tiny a toy one. Its traced matrices are gemma's `Einsum` weights.

Same model, batch and sequence length for every case; random tokens, every
position in the loss. Train = jit(value_and_grad(mean loss) + AdamW update),
donated. Peak memory is the device's peak_bytes_in_use of each process. The
second moments are synthetic (positive, non-constant): speed does not depend
on their values. README "Results" quotes this script's output.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--mode", default="all")
p.add_argument("--arch", default="decoder", choices=("decoder", "gemma3"))
p.add_argument("--modes", default="train,none,adafactor,adam_rank1,adam", help="the cases of --mode=all")
p.add_argument("--model", default="small")
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--batch", type=int, default=64)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--vocab", type=int, default=16384)
p.add_argument("--d", type=int, default=64)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--layer_kernel", default="auto", help="encoder.layer_kernel: auto | xla | pallas (exact Adam's layers)")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import trackstar_jax as tsj
from trackstar_jax import configs, losses
from trackstar_jax.models import DecoderLM, TransformerConfig


def run_all(args) -> None:
  """Every mode in its own process (peak memory per case), then the ratio table."""
  results = []
  modes = args.modes.split(",")
  for mode in modes:
    cmd = [sys.executable, __file__] + [a for a in sys.argv[1:] if not a.startswith("--mode=")] + [f"--mode={mode}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not line:
      print(out.stdout[-2000:], out.stderr[-4000:])
      continue
    results.append(json.loads(line[-1]))
    print(line[-1], flush=True)
  base = [r for r in results if r["mode"] == "train"]
  if base:
    for r in results:
      print(
        f"{r['mode']:>11}: tok/s ratio {r['tok_s'] / base[0]['tok_s']:.3f}  peak ratio "
        f"{r['peak_gib'] / max(base[0]['peak_gib'], 1e-9):.3f}  ({r['tok_s']:.0f} tok/s, {r['peak_gib']:.2f} GiB)"
      )
  if len(results) != len(modes):
    sys.exit(1)


# Gemma3_1B's published shape (gemma.gm.nn._gemma); every 6th layer global, the others sliding-window.
GEMMA3_SHAPES = {
  "gemma3_1b": dict(
    embed_dim=1152, hidden_dim=6 * 1152, num_heads=4, head_dim=256, num_kv_heads=1, num_layers=26, global_every=6
  ),
  "tiny": dict(embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8, num_kv_heads=1, num_layers=2),
}


def make_model(args):
  """(apply_fn(params, inputs, pad_mask) -> logits, params, encoder options) of --arch / --model."""
  tokens = np.ones((1, args.seq), np.int32)
  if args.arch == "decoder":
    mc = configs.model_config(args.model, max_len=args.seq)
    mc.dtype = args.dtype
    model = DecoderLM(TransformerConfig.from_config(mc, vocab_size=args.vocab))
    return model.apply, jax.jit(model.init)(jax.random.key(0), tokens), {}
  from trackstar_jax.models import gemma_lm  # pylint: disable=g-import-not-at-top  (needs gemma)

  model = gemma_lm.tiny_gemma3(
    vocab_size=args.vocab, sliding_window_size=512, dtype=jnp.dtype(args.dtype), **GEMMA3_SHAPES[args.model]
  )
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  return gemma_lm.model_apply(model), params, dict(param_regex=gemma_lm.PARAM_REGEX, block_regex=gemma_lm.BLOCK_REGEX)


def run_one(args) -> None:
  apply_fn, params, enc_opts = make_model(args)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, args.vocab, (args.batch, args.seq)).astype(np.int32)
  batch = dict(
    inputs=tokens,
    targets=np.roll(tokens, -1, 1),
    loss_mask=np.ones(tokens.shape, np.float32),
    pad_mask=np.ones(tokens.shape, bool),
    ids=np.arange(args.batch),
  )
  n_params = sum(x.size for x in jax.tree.leaves(params))
  dev = jax.devices()[0]

  def timeit(fn):
    out = fn()
    jax.block_until_ready(out)
    out = fn()
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(args.steps):
      out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / args.steps

  if args.mode == "train":
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    gbatch = jax.device_put(batch)

    def step(params, opt_state, batch):
      def loss(p):
        return losses.mean_token_loss(apply_fn(p, batch["inputs"], batch["pad_mask"]), batch)

      l, g = jax.value_and_grad(loss)(params)
      u, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state, l

    jstep = jax.jit(step, donate_argnums=(0, 1))
    state = [params, opt_state]

    def run():
      state[0], state[1], l = jstep(state[0], state[1], gbatch)
      return l

    dt = timeit(run)
  else:
    if args.mode in ("adam", "adam_rank1"):
      st = optax.scale_by_adam().init(params)
      st = st._replace(
        nu=jax.tree.map(
          lambda x: (
            jnp.full(x.shape, 1e-4, jnp.float32)
            + 1e-6 * jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) / x.size
          ),
          st.nu,
        )
      )
    elif args.mode == "adafactor":
      st = optax.scale_by_factored_rms(min_dim_size_to_factor=32).init(params)
      st = jax.tree.map(lambda x: x + 1e-4 if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
    else:
      st = None
    enc = tsj.build_encoder(
      apply_fn=apply_fn,
      params=params,
      opt_state=st,
      seq_len=args.seq,
      d_in=args.d,
      d_out=args.d,
      correction=args.mode,
      layer_kernel=args.layer_kernel,
      **enc_opts,
    )
    del st
    params = None
    dt = timeit(lambda: enc.encode(batch))
    modes = sorted(set(enc.modes().values()))
    kernels = sorted(set(enc.projector.layer_kernels().values()))
  stats = dev.memory_stats() or {}
  print(
    json.dumps(
      dict(
        mode=args.mode,
        arch=args.arch,
        model=args.model,
        params=n_params,
        dtype=args.dtype,
        batch=args.batch,
        seq=args.seq,
        step_s=dt,
        tok_s=args.batch * args.seq / dt,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        layer_modes=None if args.mode == "train" else modes,
        layer_kernels=None if args.mode == "train" else kernels,
        device=str(dev),
      )
    )
  )


def main() -> None:
  args = p.parse_args()
  run_all(args) if args.mode == "all" else run_one(args)


if __name__ == "__main__":
  main()
