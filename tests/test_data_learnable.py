"""The default synthetic world is learnable by the tiny LM from held-out prompts (slow).

Trains the `tiny` DecoderLM (2 layers, d=128) for 1500 steps at batch 64 on the
default world and checks teacher-forced exact-match accuracy on the queries,
whose prompts use phrasings that never occur in the corpus. 5-15 min on 2
busy CPU cores; ~15 s on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import configs, losses
from trackstar_jax.data import batching, world
from trackstar_jax.data import tokenizer as tokenizer_lib
from trackstar_jax.models.transformer import DecoderLM, TransformerConfig


@pytest.mark.slow
def test_tiny_lm_learns_facts_stated_three_times():
  cfg = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=32)
  data = world.generate_world(**world.world_params(cfg.world))
  tok = tokenizer_lib.train_tokenizer([c["text"] for c in data.corpus], vocab_size=2048)
  corpus = batching.tokenize_corpus(tok, data.corpus, seq_len=32)
  queries = batching.tokenize_queries(tok, data.queries, seq_len=32)

  model = DecoderLM(TransformerConfig.from_config(cfg.model, vocab_size=tok.vocab_size))
  params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32), None)
  steps = 1500
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, steps, 3e-4)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.01))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: losses.mean_token_loss(model.apply(p, batch["inputs"], batch["pad_mask"]), batch))(
      params
    )
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batches = batching.iterate_batches(corpus, batch_size=64, shuffle=True, epochs=None, pad_last=False)
  for _ in range(steps):
    params, opt_state = step(params, opt_state, next(batches))

  logits = model.apply(params, queries.inputs, queries.pad_mask)
  hit = (np.asarray(logits.argmax(-1)) == queries.targets) | (queries.loss_mask == 0)
  correct = hit.all(-1)
  freq = np.array([q["frequency"] for q in data.queries])
  assert correct[freq >= 3].mean() >= 0.9, correct[freq >= 3].mean()
  assert correct[freq == 1].mean() < correct[freq >= 10].mean()
