"""Reading and writing ONNX model files safely.

Reading turns every way a file can be wrong (missing, a directory, empty, not protobuf, a
protobuf that is not a model, external data that is missing, too short, or outside the
model's folder) into one :class:`~bnfold.errors.ModelLoadError` line that names the file.

Writing is atomic: the model (and its external data, if any) is written into a fresh hidden
folder beside the destination, flushed, then renamed into place, data first and the model
last. A failed or interrupted write leaves the destination as it was; an input file is never
overwritten unless the caller says ``in_place=True``.

External data goes to ``<name>.data``, or to ``<name>.<8 hex>.data`` while the model being
replaced (or the input) still uses that name: new bytes are never renamed over data a model in
place refers to. Once the new model is in place, the data files of the model it replaced that
follow this naming and that neither the new model nor the input uses are removed, so writing
the same destination on every build alternates between two names instead of piling up.

The staging folder is ``.<name>.<random>.tmp`` in the destination's folder. A process killed
mid-write (SIGKILL, power loss) cannot remove it; the next write to the same destination
removes such folders once they are older than :data:`STALE_STAGING_SECONDS` (an hour: far
longer than any write, so a concurrent writer's live folder is never touched).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import ModelLoadError, OutputError

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**24

PathLike = str | os.PathLike

STALE_STAGING_SECONDS = 3600


def load_model(path: PathLike, *, load_external_data: bool = True, check: bool = False) -> onnx.ModelProto:
    """Load an ONNX model, or raise ModelLoadError with one line naming the problem.

    Args:
        path: the ``.onnx`` file.
        load_external_data: read tensors stored in external files into the model. Their
            locations are checked first either way: relative, inside the model's folder
            (symbolic links resolved), present and long enough.
        check: also run ``onnx.checker`` (no full check) on the bytes read and the cheap
            fold preconditions of :mod:`bnfold.inputcheck` (opset >= 7, known domains).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not data:
        raise ModelLoadError(f"{path}: is empty (0 bytes), not an ONNX model")
    model = parse_model(data, name=str(path))
    check_external_data(model, path.parent, name=str(path))
    if check:
        from bnfold import inputcheck

        inputcheck.check_foldable(model, str(path))  # first: its opset message says more than the checker's
        inputcheck.check_structure(data, path, external=uses_external_data(model))
    if load_external_data and uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read external data: {exc}") from exc
    return model


def parse_model(data: bytes, *, name: str = "<bytes>") -> onnx.ModelProto:
    """Parse serialized bytes into a ModelProto that at least looks like a model."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{name}: not an ONNX model (protobuf parse failed: {exc or 'truncated or corrupt'})"
        ) from exc
    if not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{name}: is a protobuf message but not an ONNX model (no graph or opset)")
    return model


def _iter_tensors(model: onnx.ModelProto):
    # Every TensorProto that may carry external data: initializers, sparse initializers and
    # Constant-node attributes, in the main graph, subgraphs and functions.
    return onnx.external_data_helper._get_all_tensors(model)


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in _iter_tensors(model))


def check_external_data(model: onnx.ModelProto, base_dir: PathLike, *, name: str) -> None:
    """Refuse external-data locations that escape ``base_dir`` or point at missing/short files."""
    base = Path(base_dir).resolve()
    for tensor in _iter_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        if any(isinstance(v, bytes) for kv in info.items() for v in kv):
            # protobuf hands back bytes for a string field that is not valid UTF-8
            raise ModelLoadError(f"{name}: tensor {tensor.name!r} has an external-data entry that is not valid UTF-8")
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{name}: tensor {tensor.name!r} has external data without a location")
        if "\0" in location:  # no file name holds one (os.path would raise ValueError)
            raise ModelLoadError(f"{name}: tensor {tensor.name!r} external-data path {location!r} contains a NUL byte")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:3]:
            raise ModelLoadError(
                f"{name}: tensor {tensor.name!r} has an absolute external-data path {location!r}; "
                "only paths inside the model's folder are allowed"
            )
        target = (base / location).resolve()
        if base not in target.parents and target != base:
            raise ModelLoadError(
                f"{name}: tensor {tensor.name!r} external-data path {location!r} escapes the model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(f"{name}: tensor {tensor.name!r} external-data file {location!r} is missing")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as exc:
            raise ModelLoadError(f"{name}: tensor {tensor.name!r} has a malformed external-data offset/length") from exc
        size = target.stat().st_size
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise ModelLoadError(
                f"{name}: tensor {tensor.name!r} external data {location!r} is too short "
                f"(needs bytes {offset}..{offset + (length or 0)}, file has {size})"
            )


def save_model(
    model: onnx.ModelProto,
    dst: PathLike,
    *,
    external_data: bool | None = None,
    src: PathLike | None = None,
    in_place: bool = False,
) -> Path:
    """Write ``model`` to ``dst`` atomically; returns the destination path.

    Args:
        model: the model to write; not modified.
        dst: destination ``.onnx`` path. Its folder must exist and be writable.
        external_data: store tensors in ``<dst name>.data`` beside the model. ``None`` means
            "only if the model would not fit in one protobuf".
        src: the input file the model came from; writing over it is refused unless
            ``in_place`` is true.
        in_place: allow ``dst`` to be ``src``.
    """
    dst = Path(dst)
    with staged_output(dst, src=src, in_place=in_place) as out:
        if external_data is None:
            external_data = model.ByteSize() > PROTOBUF_LIMIT
        staged_model = out.path(dst.name)
        written: list[str] = []
        try:
            if external_data:
                data_name = out.data_name()
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                onnx.external_data_helper.convert_model_to_external_data(
                    copy, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
                )
                onnx.save_model(copy, str(staged_model))
                if out.path(data_name).exists():
                    written.append(data_name)
            else:
                # Serialize once (ByteSize() costs as much as serializing) and check the length.
                try:
                    data = model.SerializeToString()
                except ValueError as exc:
                    raise OutputError(f"{dst}: the model is over 2 GB; it must be saved with external data") from exc
                if len(data) > PROTOBUF_LIMIT:
                    raise OutputError(f"{dst}: the model is over 2 GB; it must be saved with external data")
                with open(staged_model, "wb") as f:
                    f.write(data)
                if staged_model.stat().st_size != len(data):  # never rename a short file into place
                    raise OutputError(f"{dst}: write failed: wrote {staged_model.stat().st_size} of {len(data)} bytes")
        except OSError as exc:
            raise OutputError(f"{dst}: write failed: {exc.strerror or exc}") from exc
        return out.commit(written)


def check_destination(dst: PathLike, *, src: PathLike | None = None, in_place: bool = False) -> Path:
    """The folder of ``dst`` once the checks every write makes first passed (OutputError if not)."""
    dst = Path(dst)
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{dst}: cannot write: folder {folder} does not exist")
    if dst.is_dir():
        raise OutputError(f"{dst}: cannot write: is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{dst}: cannot write: folder {folder} is not writable")
    if src is not None and not in_place and _same_file(src, dst):
        raise OutputError(f"{dst}: is the input model; refusing to overwrite it (use --in-place)")
    return folder


class StagedOutput:
    """The staging folder of one atomic write (see the module docstring): write files into
    :meth:`path`, then :meth:`commit` flushes them and renames them into place, data first."""

    def __init__(self, dst: Path, folder: Path, staging: Path, *, src: Path | None = None):
        self.dst, self.folder, self.staging, self.src = dst, folder, staging, src
        self._data_name: str | None = None
        self._ours = re.compile(rf"{re.escape(dst.name)}(\.[0-9a-f]{{8}})?\.data")
        self._uses: tuple[set[str], set[str]] | None = None

    def path(self, name: str) -> Path:
        return self.staging / name

    def _in_use(self) -> tuple[set[str], set[str]]:
        """(data files named as this module names them that the model about to be replaced
        uses, those the input uses): never written over; the input's never removed. Only
        read from the models when such files exist (a glob of the folder, usually empty)."""
        if self._uses is None:
            try:
                ours = {p.name for p in self.folder.glob(f"{glob.escape(self.dst.name)}.*data")
                        if self._ours.fullmatch(p.name)}
            except OSError:
                ours = set()
            replaced = _data_files_of(self.dst) & ours if ours else set()
            kept = set()
            if ours and self.src is not None and not _same_file(self.src, self.dst) \
                    and Path(self.src).parent.resolve() == self.folder.resolve():
                kept = _data_files_of(self.src) & ours
            self._uses = (replaced, kept)
        return self._uses

    def data_name(self) -> str:
        """The external-data file name for this write: ``<name>.data`` unless the model being
        replaced or the input uses it (then a fresh ``<name>.<8 hex>.data``)."""
        if self._data_name is None:
            name = f"{self.dst.name}.data"
            replaced, kept = self._in_use()
            in_use = name in replaced or name in kept or (self.folder / name).is_symlink()
            self._data_name = _fresh_data_name(self.folder, self.dst.name) if in_use else name
        return self._data_name

    def commit(self, data_names: list[str] = ()) -> Path:
        self._in_use()  # what the model being replaced uses, read before it is replaced
        try:
            for name in [*data_names, self.dst.name]:
                with open(self.staging / name, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self.staging / name, self.folder / name)
        except OSError as exc:
            raise OutputError(f"{self.dst}: write failed: {exc.strerror or exc}") from exc
        self._remove_replaced_data(set(data_names))
        return self.dst

    def _remove_replaced_data(self, written: set[str]) -> None:
        """Remove the data files of the model just replaced that nothing uses any more: only
        names this module gives (``<name>.data``, ``<name>.<8 hex>.data``), plain files, not
        the input's. Best effort: a file that cannot be removed is left."""
        replaced, kept = self._in_use()
        for name in sorted(replaced - written - kept):
            path = self.folder / name
            if not self._ours.fullmatch(name) or path.is_symlink() or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def staged_output(dst: PathLike, *, src: PathLike | None = None, in_place: bool = False):
    """A :class:`StagedOutput` for ``dst`` (the checks of :func:`save_model` first); the staging
    folder is removed on the way out, so anything not committed leaves no trace."""
    dst = Path(dst)
    folder = check_destination(dst, src=src, in_place=in_place)
    remove_stale_staging(folder, dst.name)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write: {exc.strerror or exc}") from exc
    try:
        yield StagedOutput(dst, folder, staging, src=Path(src) if src is not None else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(folder: Path, name: str, *, max_age: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Remove staging folders ``.<name>.*.tmp`` in ``folder`` older than ``max_age`` seconds.

    Left behind by killed writers; only real folders of exactly that pattern, never a
    symbolic link or a file. Best effort: a folder that cannot be removed is left alone.
    """
    removed = []
    now = time.time()
    try:
        candidates = list(folder.glob(f".{glob.escape(name)}.*.tmp"))
    except OSError:
        return removed
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or now - path.lstat().st_mtime < max_age:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _fresh_data_name(folder: Path, model_name: str) -> str:
    # Renaming new data over an existing data file before the model is replaced would leave
    # the old model pointing at the new bytes if we were interrupted in between; a data file
    # of its own keeps the destination consistent at every instant.
    while True:
        name = f"{model_name}.{os.urandom(4).hex()}.data"
        if not os.path.lexists(folder / name):
            return name


def _data_files_of(path: PathLike | None) -> set[str]:
    """The external-data locations the model file ``path`` refers to; empty when there is no
    such file or it is not a model. Reads the file's structure only (memory-mapped, payloads
    skipped), so a large one-file model costs little."""
    if path is None:
        return set()
    import mmap

    from bnfold.stream.source import PLACEHOLDER_KEY, build_skeleton

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return set()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                skeleton, _, _ = build_skeleton(mapped, Path(path).name)
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except (OSError, ValueError, DecodeError):
        return set()
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        entries = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL and PLACEHOLDER_KEY not in entries:
            locations.add(entries.get("location", ""))
    return locations - {""}


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
