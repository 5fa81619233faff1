r"""Encoding throughput and memory against a training step, side by side.

  python -m launch.benchmark_encode --config=configs/lama.py:model=small \
      --batch_size=256 --out=/tmp/bench_encode.json

Each variant (a training step with AdamW and with Adafactor, and the encoder
with correction none / adafactor / adam / adam_rank1) runs in its own child
process on the same device, so peak device memory is per variant. Inputs are
random tokens with every position in the loss (a fully packed batch); the
optimizer states come from two real optimizer steps, so second moments are
non-trivial. Reports tokens/s (median of timed repeats after warm-up) and
peak device memory, and the ratios the spec asks for:
encode tokens/s / train-step tokens/s (target >= 0.9) and
encode peak memory / train-step peak memory (target <= 1.2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lama.py:model=small", "Experiment config.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Examples per step.")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Tokens per example (0 = config.seq_len).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary (0 = config.tokenizer.vocab_size).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats per variant.")
_VARIANTS = flags.DEFINE_list(
    "variants", "train_adamw,train_adafactor,none,adafactor,adam,adam_rank1", "Variants to run.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one variant and print its JSON.")
_OUT = flags.DEFINE_string("out", "", "Write the results JSON here.")


def _peak_bytes() -> int:
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return int(stats.get("peak_bytes_in_use", 0))


def _run_variant(variant: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from trackstar_jax import mesh as mesh_lib
  from trackstar_jax import optim
  from trackstar_jax import train as train_lib
  from trackstar_jax.encoder import TrackStarEncoder
  from trackstar_jax.models import DecoderLM, TransformerConfig

  config = _CONFIG.value
  seq_len = _SEQ.value or config.seq_len
  vocab = _VOCAB.value or config.tokenizer.vocab_size
  b = _BATCH.value
  model = DecoderLM(TransformerConfig.from_config(config.model, vocab_size=vocab))
  mesh = mesh_lib.make_mesh(config.mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (b, seq_len + 1)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((b, seq_len), np.float32),
               pad_mask=np.ones((b, seq_len), bool), ids=np.arange(b, dtype=np.int64))
  train_cfg = config.train.copy_and_resolve_references()
  with train_cfg.unlocked():
    train_cfg.optimizer = "adafactor" if variant in ("train_adafactor", "adafactor") else "adamw"
  optimizer = optim.make_optimizer(train_cfg)
  params = train_lib.init_params(model, seq_len=seq_len, seed=0, sharding=mesh_lib.replicated(mesh))
  opt_state = jax.jit(optimizer.init)(params)
  step = train_lib.make_train_step(model, optimizer, mesh)
  sharded = mesh_lib.shard_batch({k: batch[k] for k in train_lib.TRAIN_KEYS}, mesh)
  for _ in range(2):  # non-trivial second moments
    params, opt_state, _ = step(params, opt_state, sharded)
  jax.block_until_ready(params)

  if variant.startswith("train"):
    def once():
      nonlocal params, opt_state
      params, opt_state, m = step(params, opt_state, sharded)
      return m["loss"]
  else:
    enc_cfg = config.encoder.copy_and_resolve_references()
    with enc_cfg.unlocked():
      enc_cfg.correction = variant
    host_params = jax.device_get(params)
    host_state = jax.device_get(opt_state) if variant != "none" else None
    del params, opt_state, step
    encoder = TrackStarEncoder(model_apply=model.apply, params=host_params, config=enc_cfg,
                               opt_state=host_state, mesh=mesh, seq_len=seq_len)
    global_batch, _ = encoder._prepare(batch)  # device-resident: time the kernel, not the transfer
    once = lambda: encoder._fn(encoder.params, encoder.arrays, global_batch)

  jax.block_until_ready(once())  # compile
  jax.block_until_ready(once())
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(once())
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  out = dict(variant=variant, batch_size=b, seq_len=seq_len, vocab=vocab, median_s=median,
             tokens_per_s=b * seq_len / median, peak_bytes=_peak_bytes(),
             device=str(jax.devices()[0].device_kind), n_params=model.config.num_params())
  if not variant.startswith("train"):
    out["dim"] = encoder.dim
    out["modes"] = sorted(set(encoder.modes().values()))
  return out


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(_run_variant(_CHILD.value)), flush=True)
    return
  results = {}
  passthrough = [a for a in sys.argv[1:] if not a.startswith(("--child", "--out", "--variants"))]
  for variant in _VARIANTS.value:
    proc = subprocess.run([sys.executable, "-m", "launch.benchmark_encode", f"--child={variant}", *passthrough],
                          capture_output=True, text=True, env=os.environ.copy())
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"{variant}: FAILED\n{proc.stderr[-3000:]}")
      continue
    results[variant] = json.loads(line[0][len("RESULT "):])
  base = {"adafactor": "train_adafactor"}
  print(f"{'variant':<16}{'tokens/s':>14}{'peak GiB':>10}{'tok/s ratio':>13}{'mem ratio':>11}")
  for name, r in results.items():
    ref = results.get(base.get(name, "train_adamw"))
    ratio = mem = ""
    if ref and not name.startswith("train"):
      r["throughput_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
      r["memory_ratio"] = r["peak_bytes"] / max(ref["peak_bytes"], 1)
      ratio, mem = f"{r['throughput_ratio']:.3f}", f"{r['memory_ratio']:.3f}"
    print(f"{name:<16}{r['tokens_per_s']:>14,.0f}{r['peak_bytes'] / 2**30:>10.2f}{ratio:>13}{mem:>11}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), results=results), f, indent=1)


if __name__ == "__main__":
  app.run(main)
