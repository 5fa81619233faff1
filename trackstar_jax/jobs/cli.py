"""What every absl launcher in `launch/` shares: the config / workdir / distributed flags and start-up.

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(workdir_help="...")

def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)     # multi-host init, quiet Orbax
  ... = jobs.<job>.run(config, WORKDIR.value)
  cli.finish(config, WORKDIR.value, "<job>")         # <workdir>/<job>_config.json, on success only

if __name__ == "__main__":
  cli.run(main)                                      # strict --config.x.y overrides, then app.run
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from trackstar_jax import checkpointing, configs
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.jobs import workdir as workdir_lib

DEFAULT_CONFIG = "configs/synthetic.py"


def define_flags(*, workdir_help: str, default_config: str = DEFAULT_CONFIG):
  """--config (an ml_collections config file; `file.py:arg` and `--config.x.y=v` overrides),
  --workdir (required) and --distributed."""
  config = config_flags.DEFINE_config_file(
    "config",
    default_config,
    "Experiment config file (configs/*.py); `path.py:key=value,...` selects variants, "
    "`--config.section.field=value` overrides a field (tuples, not lists).",
    lock_config=True,
  )
  workdir = flags.DEFINE_string("workdir", None, workdir_help, required=True)
  distributed = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() (multi-host; also "
    "started when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set).",
  )
  return config, workdir, distributed


def define_compilation_cache_flag():
  """--compilation_cache: JAX's persistent compilation cache, for launchers that build many encoders."""
  return flags.DEFINE_string(
    "compilation_cache", "", "JAX persistent compilation cache dir (default <workdir>/jax_cache; 'none' to disable)."
  )


def use_compilation_cache(flag, workdir: str) -> None:
  """JAX's persistent compilation cache at `flag`'s dir ('' = <workdir>/jax_cache; 'none': off), unless one is set.

  The ladder builds an encoder per job and variant; identical programs then
  compile once per workdir instead of once per job (and not at all on reruns).
  """
  import jax  # pylint: disable=g-import-not-at-top

  if flag.value == "none" or jax.config.jax_compilation_cache_dir:
    return
  path = flag.value or os.path.join(workdir, "jax_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_START = {}


def start(argv, config_flag, distributed_flag):
  """Rejects stray arguments, quiets Orbax, starts multi-host JAX when asked; returns the config."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpointing.quiet_orbax_logging()
  mesh_lib.maybe_initialize_distributed(force=distributed_flag.value)
  _START["t"] = time.time()
  return config_flag.value


def output_dir(path: str) -> str:
  """The folder of an output file or store URL (local or kvstore)."""
  return path.rstrip("/").rpartition("/")[0] or "."


def finish(config, directory: str, job: str, **summary) -> None:
  """Records, next to the outputs it produced and only once the job succeeded, the resolved config
  (`<directory>/<job>_config.json`) and one metrics line (`<directory>/<job>_metrics.jsonl`: wall time and
  `summary`). A training workdir that is only read (outputs redirected elsewhere) is left untouched."""
  summary = dict(job=job, time=time.time(), wall_s=round(time.time() - _START.get("t", time.time()), 3), **summary)
  workdir_lib.write_job_config(config, directory, job)
  workdir_lib.append_metrics(f"{directory.rstrip('/')}/{job}_metrics.jsonl", summary)


def run(main, *, default_config: str = DEFAULT_CONFIG) -> None:
  """`app.run(main)`, after refusing unknown `--config.x.y=` overrides with a "did you mean" (exit 2).

  absl's config flags fail on an unknown leaf deep inside flag parsing, with a
  traceback that does not name the typo's likely fix.
  """
  try:
    configs.check_overrides(argv=sys.argv, default_file=default_config)
  except ValueError as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main)
