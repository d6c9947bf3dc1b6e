"""Streaming I/O for ``fold_file``: fold a model file without parsing or holding its weights.

* :mod:`.wire` — the protobuf wire format, just enough to walk an ONNX file;
* :mod:`.source` — open a file as a skeleton ModelProto (big initializers become placeholders
  that point into a memory map) and read payloads lazily;
* :mod:`.store` — the hook the main graph's GraphIndex uses to read tensors and to keep the
  folded ones out of the proto;
* :mod:`.writer` — write the result: small parts re-serialized, untouched payloads copied
  byte for byte (``os.copy_file_range``), folded ones written from their arrays;
* :mod:`.foldfile` — ``fold_file`` on top of these (the path ``bnfold fold --no-validate``
  takes).
"""
