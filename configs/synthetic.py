r"""Synthetic fact world, tiny LM on CPU: the embedded default.

  python -m launch.train --config=configs/synthetic.py --workdir=/tmp/ts_synth

Arguments: `model` (a preset of trackstar_jax.configs.MODEL_PRESETS),
`runlocal` (fewer steps, a smaller world: a smoke run in seconds).
"""

from trackstar_jax import configs


def get_config(arg=None):
  a = configs.parse_arg(arg, model="tiny", runlocal=False)
  # With the 2048-piece tokenizer the longest corpus sentence is 24 tokens
  # (BOS/EOS included; median 15): seq_len 24 wastes less compute on padding.
  c = configs.base_config(dataset="synthetic_facts", model=a.model, seq_len=32 if a.runlocal else 24)
  c.tokenizer.vocab_size = 2048  # 512 splits names into letters: <90% on freq>=3
  # 700 steps x 64 sentences (3.6 epochs) at lr 1e-2: ~0.96 query accuracy on
  # facts stated >= 3 times, in under 3 minutes on a 2-core CPU
  # (tests/test_train.py, slow). At lr 3e-3 the same accuracy takes ~1500 steps.
  c.train.num_steps = 700
  c.train.warmup_steps = 50
  c.train.batch_size = 64
  c.train.learning_rate = 1e-2
  c.train.eval_every = 350
  c.train.checkpoint_every = 350
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
    c.lds.num_models = 8
    c.lds.models_per_step = 4
    c.lds.bootstrap_samples = 200
  return c
