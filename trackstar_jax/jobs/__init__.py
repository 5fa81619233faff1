"""The jobs layer: one module per launcher in `launch/`, each a `run(config, workdir, ...)`.

  train        trains the LM: checkpoints with params and optimizer state
  fit_hessian  R^{-1/2} from a corpus sample and the queries
  encode       raw phi of every corpus example into the encoding store
  retrieve     top-k proponents / opponents of every query -> results JSONL
  evaluate     fact-tracing metrics and tail-patch of results files
  pipeline     the whole ablation ladder, every stage resumable

Only this layer knows the workdir layout (`workdir`), checkpoints on disk
and config files; it is built on the public API (`trackstar_jax.api`).
`cli` holds what every launcher shares (flags, multi-host start-up).
"""
