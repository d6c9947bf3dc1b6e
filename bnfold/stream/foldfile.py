"""``fold_file`` without loading the model: open mapped, fold the skeleton, write by streaming.

The passes are the library's own (:func:`bnfold.api._fold_owned`); only where tensors come
from and go to differs (:mod:`.source`, :mod:`.store`, :mod:`.writer`). The output is what
``fold_file`` writes on the in-memory path — same report, same folded values bit for bit,
untouched tensors byte for byte — through the same atomic staging folder as
``modelio.save_model`` (files fsynced, data renamed before the model). A source with external
data gives an output with external data (``<OUT>.data``, or a fresh name when one exists),
and its folded tensors are appended to the staged data file as they are computed.

``result.model`` keeps the big tensors in the written files: external-data references, as
``onnx.load(result.output, load_external_data=False)`` gives (for a one-file output they
point at the ``raw_data`` bytes inside it); ``onnx.load(result.output)`` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from bnfold.errors import OutputError, UnsupportedModelError
from bnfold.modelio import PROTOBUF_LIMIT, staged_output
from bnfold.stream.source import open_model
from bnfold.stream.store import TensorStore
from bnfold.stream import writer

_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def fold_file_streamed(src: Path, dst: Path, enabled: frozenset[str], *, in_place: bool, partial: bool,
                       progress=None, before_commit=None, **fold_options):
    """Fold ``src`` into ``dst`` (see module docstring); ``fold_options`` as ``_fold_owned``'s.

    ``before_commit(staged, result)``, when given, is called once everything is written to the
    staging folder, before anything is flushed or renamed into place: ``staged`` is the
    complete staged model file (its data file beside it), ``result`` the FoldResult with its
    sizes. If it raises, nothing is written (``fold_file``'s validation).
    """
    from bnfold.api import _fold_owned, blocking_message

    def fold(store: TensorStore):
        result = _fold_owned(source.model, source.pristine, enabled, measure=False, tensors=store,
                             **fold_options)
        blocking = result.report.blocking()
        if blocking and not partial:
            raise UnsupportedModelError(blocking_message(src, blocking))
        return result

    written = [0]

    def bytes_progress(n: int) -> None:
        # The output's payloads are the source's, folded or copied: their total is the scale.
        written[0] += n
        if progress is not None:
            progress(min(written[0], total), total)

    with open_model(src) as source:
        bytes_before = source.bytes_on_disk()
        total = max(1, source.payload_bytes())
        if not source.external:
            store = TensorStore(source)
            result = fold(store)
        with staged_output(dst, src=src, in_place=in_place) as staged:
            names: list[str] = []
            try:
                model_fd = os.open(staged.path(dst.name), _CREATE, 0o666)
                try:
                    offsets = None
                    if not source.external:
                        try:
                            offsets = writer.write_inline(result.model, store, model_fd, limit=PROTOBUF_LIMIT,
                                                          progress=bytes_progress)
                        except writer.TooLarge:
                            pass  # over protobuf's limit in one file: external data, as save_model does
                        else:
                            store.arrays.clear()  # written: a check of the staged file need not hold them too
                    if offsets is None:
                        data_name = staged.data_name()
                        data_fd = os.open(staged.path(data_name), _CREATE, 0o666)
                        try:
                            if source.external:
                                store = TensorStore(source, data_fd=data_fd, data_name=data_name,
                                                    progress=bytes_progress)
                                result = fold(store)
                            if writer.write_external(result.model, store, model_fd, data_fd, data_name,
                                                     progress=bytes_progress):
                                names.append(data_name)
                        finally:
                            if source.external:
                                store.close()
                            os.close(data_fd)
                finally:
                    os.close(model_fd)
            except OSError as exc:
                raise OutputError(f"{dst}: write failed: {exc.strerror or exc}") from exc
            result.report.bytes_before = bytes_before
            result.report.bytes_after = sum(staged.path(n).stat().st_size for n in [*names, dst.name])
            if before_commit is not None:
                before_commit(staged.path(dst.name), result)
            staged.commit(names)
        if progress is not None:
            progress(total, total)  # dropped tensors (BN parameters) are never written: finish the bar
        if offsets is not None:
            writer.point_into(result.model, dst.name, offsets)
        result.output = dst
    return result
