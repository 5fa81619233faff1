"""A placeholder `tensorflow` for GPU hosts that cannot install TensorFlow (benchmarks only, never the library).

kauldron (which `gemma.gm.nn` imports) imports TensorFlow at module level in
`kauldron/typing/array_types.py` only to name `tf.Tensor` in array-type
aliases; the Gemma model itself is pure JAX. With this folder first on
PYTHONPATH, `gm.nn.Transformer` builds and runs without TensorFlow: anything
else asked of the module fails loudly (tests/test_gemma.py passes this way).

  PYTHONPATH=benchmarks/no_tensorflow:<gemma site>:$PWD python benchmarks/bench_encoder.py --arch=gemma3 ...
"""


class Tensor:  # only ever used as a type in isinstance checks: no value is a TensorFlow tensor here
  pass


def __getattr__(name):
  raise ImportError(f"tensorflow.{name}: TensorFlow is not installed (placeholder from benchmarks/no_tensorflow).")
