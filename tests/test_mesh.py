"""mesh.allgather_object: JSON objects of every process to every process (one process; two as threads)."""

import threading

import numpy as np
import pytest

from trackstar_jax import mesh as mesh_lib


def test_one_process_gets_its_object_back_through_json():
  obj = {"rows": [[3, "the cat", "doc#0"]], "n": 1, "pair": (1, 2), 7: None}
  assert mesh_lib.allgather_object(obj) == [{"rows": [[3, "the cat", "doc#0"]], "n": 1, "pair": [1, 2], "7": None}]
  assert mesh_lib.allgather_object([]) == [[]]
  with pytest.raises(TypeError, match="not JSON serializable"):
    mesh_lib.allgather_object({"x": np.zeros(2)})


def test_processes_of_different_lengths_get_every_object_in_process_order(monkeypatch):
  """Two processes as threads over a fake allgather: the padding to the longest message is cut off again."""
  n = 2
  barrier, slots, index = threading.Barrier(n, timeout=60), [None] * n, {}

  def fake_allgather(x):
    pi = index[threading.get_ident()]
    barrier.wait()  # the previous exchange was read by every thread
    slots[pi] = np.asarray(x)
    barrier.wait()
    return np.concatenate(slots)

  monkeypatch.setattr(mesh_lib, "allgather", fake_allgather)
  monkeypatch.setattr(mesh_lib.jax, "process_count", lambda: n)
  objs = [[[0, "a"]], {"é": ["ü" * 50, 1.5, None]}]  # lengths differ; non-ASCII text
  out = [None] * n

  def host(pi):
    index[threading.get_ident()] = pi
    out[pi] = mesh_lib.allgather_object(objs[pi])

  threads = [threading.Thread(target=host, args=(pi,)) for pi in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert out == [objs, objs]
