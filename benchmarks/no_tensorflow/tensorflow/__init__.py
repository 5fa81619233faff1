"""A placeholder `tensorflow` for GPU hosts that cannot install TensorFlow (benchmarks only, never the library).

kauldron (which `gemma.gm.nn` imports) imports TensorFlow at module level in
`kauldron/typing/array_types.py` only to name `tf.Tensor` in array-type
aliases, and etils asks `isinstance(x, tf.<type>)` once tensorflow is in
sys.modules; the Gemma model itself is pure JAX. Here every attribute (at any
depth) is one class of which nothing is an instance, so those checks answer
"not TensorFlow". With this folder first on PYTHONPATH, `gm.nn.Transformer`
builds and runs without TensorFlow (tests/test_gemma.py passes this way):

  PYTHONPATH=benchmarks/no_tensorflow:<gemma site>:$PWD python benchmarks/bench_encoder.py --arch=gemma3 ...
"""

PLACEHOLDER = True


def _dunder(name: str) -> bool:  # Python's own protocol names (__path__, __spec__, ...) stay absent
  return name.startswith("__") and name.endswith("__")


class _NotTensorFlow(type):
  def __getattr__(cls, name):
    if _dunder(name):
      raise AttributeError(name)
    return cls


class Placeholder(metaclass=_NotTensorFlow):  # never instantiated: no value here is a TensorFlow object
  pass


def __getattr__(name):
  if _dunder(name):
    raise AttributeError(name)
  return Placeholder


__internal__ = Placeholder  # etils: tf.__internal__.types.Tensor
