"""A local GCS server for tests: `gcp-storage-emulator` (PyPI), with three fixes TensorStore needs.

  python tests/gcs_emulator.py --port=9023 --bucket=trackstar-test   # serves http://127.0.0.1:9023 until killed

TensorStore's `gcs` driver lists a prefix as the key range [startOffset, endOffset)
of the GCS JSON API (`objects.list?startOffset=run/&endOffset=run0`). The emulator
ignores both parameters and answers every object of the bucket, so a listing of one
store would see every other store's keys, and a prefix delete (`delete_existing`)
would delete them. This wrapper filters its listings by the range, as GCS does
(startOffset inclusive, endOffset exclusive). And the emulator fails an upload of
an empty object (the store's chunk markers are empty objects): it gets b"".
And object downloads carry the object's generation (`x-goog-generation`, as GCS
sends it), which TensorStore records to revalidate its cached chunks; without it a
second read of a chunk fails with "Malformed StorageGeneration".
Everything else is the emulator's.
"""

import argparse
from http import HTTPStatus
import json

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_ls = objects.ls
_media_upload = objects._media_upload  # pylint: disable=protected-access
_download = objects.download


def _first(query, name):
  values = query.get(name)
  return values[0] if values else None


def ls_by_range(request, response, storage, *args, **kwargs):
  """objects.list, restricted to names in [startOffset, endOffset)."""
  _ls(request, response, storage, *args, **kwargs)
  start, end = _first(request.query, "startOffset"), _first(request.query, "endOffset")
  if response.status != HTTPStatus.OK or (start is None and end is None):
    return
  body = json.loads(response._content)  # pylint: disable=protected-access

  def keep(name):
    return (start is None or name >= start) and (end is None or name < end)

  body["items"] = [o for o in body.get("items", []) if keep(o.get("name", ""))]
  body["prefixes"] = [p for p in body.get("prefixes", []) if keep(p)]
  response.json(body)


def media_upload_empty(request, response, storage):
  """A media upload whose body is empty creates an empty object (the emulator reads no body as None)."""
  if request.get_header("Content-Length") == "0":
    request._data = b""  # pylint: disable=protected-access
  return _media_upload(request, response, storage)


def download_with_generation(request, response, storage, *args, **kwargs):
  """An object download with its generation and metageneration headers."""
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--bucket", required=True, help="the bucket to create")
  args = parser.parse_args()
  replace = {_ls: ls_by_range, _download: download_with_generation}
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      handlers[method] = replace.get(fn, fn)
  # Called by name from other handlers (objects.insert, objects.get): patched in the module.
  objects._media_upload = media_upload_empty  # pylint: disable=protected-access
  objects.download = download_with_generation
  srv = server.create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket)
  print(f"serving on http://{args.host}:{args.port}", flush=True)
  srv.run()


if __name__ == "__main__":
  main()
