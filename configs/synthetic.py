r"""Synthetic fact world, tiny LM on CPU: the embedded default.

  python -m launch.train --config=configs/synthetic.py --workdir=/tmp/ts_synth

Arguments: `model` (a preset of trackstar_jax.configs.MODEL_PRESETS),
`runlocal` (fewer steps, a smaller world: a smoke run in seconds).
"""

from trackstar_jax import configs


def get_config(arg=None):
  a = configs.parse_arg(arg, model="tiny", runlocal=False)
  c = configs.base_config(dataset="synthetic_facts", model=a.model, seq_len=32)
  c.tokenizer.vocab_size = 512
  c.train.num_steps = 1500
  c.train.batch_size = 64
  c.train.learning_rate = 3e-3
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  if a.runlocal:
    c.world.n_entities = 60
    c.world.n_facts = 60
    c.world.max_frequency = 20
    c.world.n_distractors = 100
    c.tokenizer.vocab_size = 256
    c.train.num_steps = 20
    c.train.warmup_steps = 5
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.train.batch_size = 16
    c.hessian.train_sample = 64
  return c
