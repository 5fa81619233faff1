"""Evaluation of fact tracing: retrieval metrics, baselines, tail-patch, ablation table.

Modules:
  metrics     MRR / recall@10 / precision@10 from results files + ground truth.
  baselines   BM25 (bm25s), dense text embeddings (optional), random floor.
  tail_patch  one-optimizer-step causal influence of each proponent (jitted, vmapped).
  ablation    the methods × metrics table (markdown + JSON).

`tail_patch` imports JAX; import it explicitly (`from trackstar_jax.evaluation
import tail_patch`) so that metrics/baselines stay cheap to import.
"""

from trackstar_jax.evaluation import ablation, baselines, metrics
from trackstar_jax.evaluation.ablation import ablation_table
from trackstar_jax.evaluation.baselines import bm25_retrieve, dense_available, dense_retrieve, random_retrieve
from trackstar_jax.evaluation.metrics import compute_metrics, load_results

__all__ = [
  "ablation",
  "baselines",
  "metrics",
  "ablation_table",
  "bm25_retrieve",
  "dense_available",
  "dense_retrieve",
  "random_retrieve",
  "compute_metrics",
  "load_results",
]
