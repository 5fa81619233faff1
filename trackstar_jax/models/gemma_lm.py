"""Gemma (google-deepmind/gemma, `gemma.gm.nn`) under the TrackStar encoder.

`gemma.gm.nn.Transformer` is a Linen model whose weight matrices are gemma's
own `Einsum` layer (a param `weight_name`, default 'w', and `jnp.einsum(eqn,
x, w)`), which `trackstar_jax.layer_registry` traces by name; gemma is not
imported by trackstar_jax unless this module's functions are called. Traced
matrices (Gemma 3, per layer i):

  layer_i/attn/q_einsum/w        [N, D, H]      'BTD,NDH->BTNH'   (GQA / MQA)
  layer_i/attn/kv_einsum/w       [2, K, D, H]   'BSD,CKDH->CBSKH'
  layer_i/attn/qkv_einsum/w      [3, N, D, H]   (when num_kv_heads == num_heads)
  layer_i/attn/attn_vec_einsum/w [N, H, D]      'BTNH,NHD->BTD'
  layer_i/mlp/gating_einsum      [2, F, D]      '...F,NHF->...NH' (transposed gating)
  layer_i/mlp/linear             [F, D]         '...H,HF->...F'

Embeddings (tied) and norms are excluded. Use:

  model = gm.nn.Transformer(config=..., dtype=jnp.float32)   # or gm.nn.Gemma3_1B() etc.
  cfg.param_regex, cfg.block_regex = gemma_lm.PARAM_REGEX, gemma_lm.BLOCK_REGEX
  encoder = TrackStarEncoder(model_apply=gemma_lm.model_apply(model),
                             params={"params": params},  # as model.apply takes them
                             config=cfg, opt_state=opt_state)  # optax state of those params

(With gemma 3.3.0 and kauldron 1.4.2, the preset classes `gm.nn.Gemma3_1B`
... fail to import: gemma's checkpoint module subclasses
`kd.ckpts.AbstractPartialLoader`, which kauldron 1.4 no longer has (1.3.0
has it; untested). `gm.nn.Transformer` with a config imports fine.)

Padding follows gemma's convention: token id 0 is padding (gemma derives the
attention mask and positions from the tokens); `pad_mask` is not used.

Install without the full kauldron/TensorFlow dependency tree (gm.nn imports
kauldron, whose `typing` module imports TensorFlow only for type aliases):
12 MB of pinned pure-Python wheels plus a placeholder `tensorflow` (as .ci/run):

  pip install --no-deps --target .gemma_site -r benchmarks/no_tensorflow/gemma-requirements.txt
  PYTHONPATH=benchmarks/no_tensorflow:.gemma_site python ...

(or with real TensorFlow: the same list plus tensorflow-cpu gast astunparse flatbuffers, 1.3 GB).

Public API:
  PARAM_REGEX, BLOCK_REGEX
  model_apply(model) -> (params, inputs, pad_mask) -> logits (gemma's nn.jit inlined)
  tiny_gemma3(*, vocab_size, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8, num_kv_heads=1,
              num_layers=2, sliding_window_size=4, global_every=2, dtype=float32) -> gm.nn.Transformer
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PARAM_REGEX = r"layer_\d+/(attn/(q|kv|qkv|attn_vec)_einsum/w|mlp/(gating_einsum|linear))$"
BLOCK_REGEX = r"layer_(?P<layer>\d+)/(?P<kind>attn|mlp)/"


def model_apply(model: Any) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """The encoder's `model_apply` for a `gm.nn.Transformer`: logits of `model.apply(params, tokens)`."""

  def apply(params: Any, inputs: jax.Array, pad_mask: jax.Array) -> jax.Array:
    del pad_mask  # gemma masks token id 0
    # `Transformer.__call__` is wrapped in nn.jit, whose cache would replay a
    # trace made before (or without) the encoder's layer interception. Inside
    # the encoder's own jit, disable_jit inlines it instead: same program
    # (the blocks are a Python loop, no scan that would be unrolled).
    with jax.disable_jit():
      return model.apply(params, inputs).logits

  return apply


def tiny_gemma3(
  *,
  vocab_size: int,
  embed_dim: int = 16,
  hidden_dim: int = 32,
  num_heads: int = 2,
  head_dim: int = 8,
  num_kv_heads: int = 1,
  num_layers: int = 2,
  sliding_window_size: int = 4,
  global_every: int = 2,
  dtype: Any = jnp.float32,
) -> Any:
  """A Gemma 3 architecture at a toy size (for tests and smoke runs; random init).

  Gemma 3's structure: grouped-query attention with QK norm, post-attention
  and post-FFW norms, local sliding-window layers interleaved with global
  ones (every `global_every`-th layer is global: 2 alternates, Gemma 3 itself uses 6),
  transposed gating einsum, two RoPE frequencies.
  """
  from gemma import gm  # pylint: disable=g-import-not-at-top

  local, global_ = gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL
  config = gm.nn.config.TransformerConfig(
    num_embed=vocab_size,
    embed_dim=embed_dim,
    hidden_dim=hidden_dim,
    num_heads=num_heads,
    head_dim=head_dim,
    num_kv_heads=num_kv_heads,
    final_logit_softcap=None,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
    use_qk_norm=True,
    attention_types=tuple(global_ if i % global_every == global_every - 1 else local for i in range(num_layers)),
    sliding_window_size=sliding_window_size,
    transpose_gating_einsum=True,
    local_base_frequency=10_000,
    global_base_frequency=1_000_000,
  )
  return gm.nn.Transformer(config=config, dtype=dtype)
