"""Safe loading and saving of ONNX models.

Everything that touches the file system for a model goes through this module, so the rest of
spa can assume it holds a well-formed `onnx_ir.Model` and never has to think about paths,
FIFOs, truncated files, external data or half-written outputs.

Loading
    Paths are checked with ``os.stat`` *before* anything opens them: a FIFO, a character
    device (``/dev/zero``, ``/dev/stdin``) or a socket would block or stream forever, so they
    are refused by type. Models are read with ``ir.load`` so that external weights stay lazy,
    memory-mapped ``ir.ExternalTensor``\\ s instead of being copied into RAM.

    A truncated protobuf does not always fail to parse. Nested messages are length-prefixed,
    so a cut inside the graph is a parse error, but a cut that falls on a top-level field
    boundary parses "successfully" into a model that silently lacks the fields after the cut
    (the graph, the opset imports, the model-local functions …). Protobuf writes fields in
    field-number order (graph=7, opset_import=8, metadata_props=14, functions=25), so a
    surviving truncation always loses a *suffix* of that list. The structural checks below
    (a graph is present and non-empty, every used domain has an opset import) refuse those
    cases without running the full ONNX checker, which would parse the file a second time and
    double peak memory on models with inline weights (measured: +0.15 s and ~2x the file size
    in RSS for a 96 MiB model). One cut cannot be told from a valid model: losing only the
    local functions leaves their calls looking like a vendor's custom ops, which load (their
    channels are frozen) and which ONNX Runtime cannot run, so the default ``--verify full``
    refuses them (:func:`foreign_ops`). External data files are checked for existence, type
    and size, not read.

Saving
    Writes are atomic: the model (and its ``<name>.data`` external-data file, when there is
    one) is first written with its *final* file names into a private temporary folder inside
    the target folder, then moved into place with ``os.replace`` — data first, model last.
    Writing under the final names matters because the model refers to its data file by
    name; and using the same folder keeps ``os.replace`` a same-file-system rename. A model
    whose lazy tensors read from the very file being replaced (saving in place) still reads
    the untouched old file while the new one is written; afterwards those tensors are
    invalidated, because a re-read would map the *new* file at the old offsets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from spa.errors import InvalidModelError, OutputError, SpaError, UnsupportedError
from spa import safety
from spa.graph import all_nodes, gc_paused, has_subgraphs
from spa.passes import upgrade_opset

__all__ = [
    "SUPPORTED_OPSETS",
    "KNOWN_DOMAINS",
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "load_model",
    "save_model",
    "at_opset",
    "model_sha256",
    "default_output_path",
    "check_model_structure",
    "foreign_ops",
]

logger = logging.getLogger(__name__)

# ONNX Runtime (1.2x+ Linux wheels) starts a telemetry session when imported and writes
# ``$TMPDIR/.ses`` (a timestamp and a UUID), which it never removes: every spa run would leave
# it in the temporary folder. Every ORT import in spa happens after this module is imported;
# a user who sets the variable keeps their value.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: Default-domain opset versions spa's channel rules are written and tested for.
SUPPORTED_OPSETS = range(11, 24)

#: Operator domains spa understands and ONNX Runtime implements. "ai.onnx" is an alias of the
#: default domain "". Other domains (custom ops) load; see :func:`foreign_ops`.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

#: Total initializer size from which weights go to an external data file. Below protobuf's
#: hard 2 GiB message limit with room for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8 * 2**30)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_model(source: str | os.PathLike[str] | onnx.ModelProto | ir.Model, *, max_memory: int | None = None) -> ir.Model:
    """Load a model from a path, an ``onnx.ModelProto`` or an ``ir.Model``, refusing bad input.

    A path is checked before it is opened (missing, directory, not a regular file, empty),
    then parsed lazily with ``ir.load``. An ``onnx.ModelProto`` is converted with
    ``ir.from_proto``. An ``ir.Model`` is validated and returned as is, not copied: it is the
    caller's object, and spa's pipeline clones before it mutates anything.

    A default-domain opset in ``upgrade_opset.UPGRADABLE_OPSETS`` (7..10) is upgraded to
    ``upgrade_opset.TARGET_OPSET`` with onnx's version converter; the returned model is then
    a new object (also for an ``ir.Model``) whose ``meta["spa.upgraded_from"]`` holds the old
    opset.

    A path or a ModelProto first goes through :func:`spa.safety.check_proto` (external data
    paths, tensor sizes, cycles, dangling values, node schemas, the memory ceiling
    ``max_memory`` in bytes, default :func:`spa.safety.default_max_memory`), before any IR is
    built or any weight read.

    Raises:
        InvalidModelError: the input is not a loadable ONNX model (one-line message naming
            the path); its subclasses in ``spa.errors`` name the structural problem.
        UnsupportedError: a valid model spa cannot handle (opset outside
            ``SUPPORTED_OPSETS``, node in an unknown domain, more memory than ``max_memory``).
    """
    with gc_paused():
        return _load(source, max_memory)


def _load(source: str | os.PathLike[str] | onnx.ModelProto | ir.Model, max_memory: int | None) -> ir.Model:
    if isinstance(source, ir.Model):
        check_model_structure(source, where="model", allow_upgrade=True)
        return _upgraded(source, "model")
    limit = safety.resolve_max_memory(max_memory)
    if isinstance(source, onnx.ModelProto):
        # An in-memory proto's relative external data is read from the working folder (as
        # onnx-ir does), so that is the folder it must stay in.
        order = safety.check_proto(source, where="ModelProto", base_dir=os.getcwd())
        try:
            model = ir.from_proto(source)
        except Exception as exc:  # foreign input: any failure to convert means "invalid"
            raise InvalidModelError(f"ModelProto: cannot convert ({_root_cause(exc)})") from exc
        # Its tensors were checked on the proto (sizes, external data): not again on the IR.
        check_model_structure(model, where="ModelProto", allow_upgrade=True, tensors=False)
        safety.check_ops(source, order, where="ModelProto", max_memory=limit)
        return _upgraded(model, "ModelProto")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(os.fspath(source), limit)
    raise InvalidModelError(
        f"cannot load a model from {type(source).__name__}: expected a path, an "
        "onnx.ModelProto or an onnx_ir.Model"
    )


def _load_path(path: str, max_memory: int) -> ir.Model:
    """Check the file by metadata alone, parse it, check the proto (``spa.safety``), then
    build the IR (what ``ir.load`` does, with the checks in between)."""
    _check_input_file(path)
    # An absolute path gives external tensors an absolute base_dir, so a later chdir does not
    # break them, and turns on onnx-ir's path-containment checks (they skip an empty base_dir).
    abs_path = os.path.abspath(path)
    try:
        # Always protobuf: onnx guesses the format from the extension, which would make a
        # random "weights.json" go through the JSON parser.
        proto = onnx.load(abs_path, format="protobuf", load_external_data=False)
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read ({_os_reason(exc)})") from exc
    except Exception as exc:  # DecodeError, ValueError … from parsing foreign bytes
        raise InvalidModelError(
            f"{path}: not a valid ONNX model (protobuf parse failed: {_one_line(exc)})"
        ) from exc
    base_dir = os.path.dirname(abs_path)
    order = safety.check_proto(proto, where=path, base_dir=base_dir)
    external = safety.has_external_data(proto)
    try:
        model = ir.from_proto(proto)
    except Exception as exc:  # onnx-ir refuses what the checks above let through
        raise InvalidModelError(f"{path}: not a valid ONNX model ({_root_cause(exc)})") from exc
    if external:  # a walk over every node's attributes: only where there is something to set
        ir.external_data.set_base_dir(model.graph, base_dir)
    # The tensors (payload sizes, external data paths, offsets and lengths) were checked on the
    # proto by check_proto: the IR holds the same tensors, so they are not walked a second time.
    check_model_structure(model, where=path, allow_upgrade=True, tensors=False)
    safety.check_ops(proto, order, where=path, max_memory=max_memory)
    del proto
    _remember_data_files(abs_path, model if external else None)
    model = _upgraded(model, path)
    logger.debug("loaded %s: %d nodes, %d initializers", path, len(model.graph),
                 len(model.graph.initializers))
    return model


def _upgraded(model: ir.Model, where: str) -> ir.Model:
    """``model`` at a supported opset: itself, or upgraded from opset 7..10 (then re-checked)."""
    version = _default_opset(dict(model.opset_imports))
    if version is None or version in SUPPORTED_OPSETS:
        return model
    model = upgrade_opset.upgrade(model, where=where)
    check_model_structure(model, where=where)
    return model


def _check_input_file(path: str) -> None:
    """Refuse anything that is not a non-empty regular file, without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidModelError(f"{path}: no such file") from None
    except NotADirectoryError:
        raise InvalidModelError(f"{path}: no such file (a parent is not a folder)") from None
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot access ({_os_reason(exc)})") from exc
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise InvalidModelError(f"{path}: is a directory, not an ONNX file")
    if not stat.S_ISREG(mode):
        raise InvalidModelError(f"{path}: not a regular file ({safety.file_kind(mode)})")
    if st.st_size == 0:
        raise InvalidModelError(f"{path}: empty file")


def check_model_structure(model: ir.Model, *, where: str = "model", allow_upgrade: bool = False,
                          tensors: bool = True) -> None:
    """Refuse a model that is empty, truncated, or outside what spa supports.

    Cheap on purpose (no second parse, no weight reads): it is what catches a truncated
    protobuf that parsed at a field boundary, see the module docstring.

    Raises:
        InvalidModelError: no graph / empty graph, a used domain without an opset import
            (a node in any other domain is fine: see :func:`foreign_ops`),
            an external data file that is missing, escapes the model folder or is too short.
        UnsupportedError: default-domain opset outside ``SUPPORTED_OPSETS`` (and, with
            ``allow_upgrade``, outside ``upgrade_opset.UPGRADABLE_OPSETS``: the caller
            upgrades those).

    ``tensors=False`` skips the tensor checks (payload sizes, external data): for a model
    just built from a proto that :func:`spa.safety.check_proto` checked.
    """
    graph = model.graph
    if graph is None or (len(graph) == 0 and len(graph.outputs) == 0):
        raise InvalidModelError(f"{where}: not an ONNX model (no graph, or a graph with no nodes "
                                "and no outputs; truncated or not an ONNX file?)")

    opsets = dict(model.opset_imports)
    function_domains = {f.domain for f in model.functions.values()}
    used = {node.domain for node in _all_nodes(model)}

    default_version = _default_opset(opsets)
    for domain in sorted(used):
        # A domain spa does not know (a vendor's custom ops) is fine: its nodes have no channel
        # rule, so the analysis freezes their channels and says which op did it.
        if domain in _DEFAULT_DOMAINS:
            if default_version is None:
                raise InvalidModelError(f"{where}: no opset_import for the default ONNX domain "
                                        "(truncated file?)")
        elif domain not in opsets and domain not in function_domains:
            raise InvalidModelError(f"{where}: nodes use domain {domain!r} but the model has "
                                    "no opset_import for it (truncated file?)")
    upgradable = upgrade_opset.UPGRADABLE_OPSETS
    if default_version is not None and default_version not in SUPPORTED_OPSETS and not (
        allow_upgrade and default_version in upgradable
    ):
        raise UnsupportedError(
            f"{where}: default-domain opset {default_version} is not supported "
            f"(supported: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}; "
            f"{upgradable.start}..{upgradable.stop - 1} are upgraded when loaded)")

    if tensors:
        _check_tensors(model, where)


def foreign_ops(model: ir.Model) -> list[str]:
    """``"domain::op_type ×n"`` for the nodes (bodies too) in a domain that neither spa nor ONNX
    Runtime knows (:data:`KNOWN_DOMAINS`) and no model-local function defines: a vendor's
    custom ops. They load and analyse (no channel rule: their channels are frozen), but ONNX
    Runtime has no kernel for them (spa registers no custom-op library), so nothing that runs
    the model in ORT (the oracle, the latency benchmark) can run. Sorted; empty when none."""
    local = {(f.domain, f.name) for f in model.functions.values()}
    counts: dict[str, int] = {}
    for node in all_nodes(model.graph):
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in local:
            key = f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
    return [k if n == 1 else f"{k} ×{n}" for k, n in sorted(counts.items())]


def _default_opset(opsets: dict[str, int]) -> int | None:
    for domain in _DEFAULT_DOMAINS:
        if domain in opsets:
            return opsets[domain]
    return None


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Nodes of the main graph, its subgraphs (If/Loop/Scan) and model-local functions."""
    yield from all_nodes(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Initializers of every graph plus tensor-valued attributes (Constant values …)."""
    for graph in _graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in _all_nodes(model):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value


def _check_tensors(model: ir.Model, where: str) -> None:
    """Make sure every tensor's bytes exist, without reading (or mapping) any weights."""
    sizes: dict[str, int] = {}
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            _check_external_tensor(tensor, where, sizes)
        else:
            _check_inline_tensor(tensor, where)


def _check_external_tensor(tensor: ir.ExternalTensor, where: str, sizes: dict[str, int]) -> None:
    location = os.fspath(tensor.location)
    name = tensor.name
    base_dir = os.fspath(tensor.base_dir) if tensor.base_dir else os.getcwd()
    # The same rules as for a file being loaded (no escape, no symlink out, no device …).
    data_path = safety.check_external_location(location, base_dir, where=where, what=f"tensor {name!r}")
    if data_path not in sizes:
        sizes[data_path] = os.stat(data_path).st_size
    offset = tensor.offset or 0
    needed = tensor.nbytes
    if tensor.length is not None and tensor.length < needed:
        raise InvalidModelError(f"{where}: external tensor {name!r} declares length "
                                f"{tensor.length} but needs {needed} bytes")
    if offset + needed > sizes[data_path]:
        raise InvalidModelError(f"{where}: external data file {location!r} is too short for "
                                f"tensor {name!r} (needs {offset + needed} bytes, has "
                                f"{sizes[data_path]}; truncated?)")


def _check_inline_tensor(tensor: ir.TensorProtocol, where: str) -> None:
    """Catch a raw_data payload whose size disagrees with the declared shape (corruption)."""
    proto = getattr(tensor, "raw", None)
    if not isinstance(proto, onnx.TensorProto) or not proto.HasField("raw_data"):
        return
    if tensor.dtype == ir.DataType.STRING:
        return
    if len(proto.raw_data) != tensor.nbytes:
        raise InvalidModelError(f"{where}: tensor {tensor.name!r} has {len(proto.raw_data)} "
                                f"bytes of data but its shape needs {tensor.nbytes}")


# --------------------------------------------------------------------------------------------
# hashing and naming
# --------------------------------------------------------------------------------------------


def model_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the ``.onnx`` file itself (not its external data), read in 1 MiB chunks.

    Plans record it so that ``spa apply`` can tell it is replaying on the model it was made
    for; streaming keeps memory flat for multi-GB inline models.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise InvalidModelError(f"{os.fspath(path)}: cannot read ({_os_reason(exc)})") from exc
    return digest.hexdigest()


def default_output_path(input_path: str | os.PathLike[str]) -> pathlib.Path:
    """``model.onnx`` → ``model.spa.onnx`` beside the input (the CLI's default ``-o``)."""
    p = pathlib.Path(input_path)
    if p.suffix.lower() == ".onnx":
        return p.with_name(f"{p.stem}.spa{p.suffix}")
    return p.with_name(f"{p.name}.spa.onnx")


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    source_path: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    external_data: bool | None = None,
    durable: bool = True,
    opset: int | None = None,
) -> pathlib.Path:
    """Write ``model`` to ``path`` atomically and return the path written.

    With ``opset`` (``--keep-opset``: the opset an upgraded input had) the model is written at
    that default-domain opset, converted by :func:`at_opset` (the version converter, checked
    in ONNX Runtime); where that is not possible a warning is logged and the model is written
    at its own opset.

    Args:
        model: the model to write; it is not modified (but see *in-place* below).
        path: the output ``.onnx`` file.
        source_path: the file the model was loaded from. Writing over it (or over an external
            data file the model still reads from) is refused unless ``in_place``, so a typo in
            ``-o`` never destroys the input.
        in_place: allow writing over ``source_path``. The model's lazy tensors that read the
            replaced data file are invalidated afterwards (reading them raises); reload from
            the returned path to keep working.
        external_data: ``True`` forces weights into ``<file name>.data`` beside the model,
            ``False`` forces them inline, ``None`` chooses: external when the model already
            has external tensors or its initializers total ≥ 1.8 GiB.
        durable: flush to disk before the rename (outputs). Scratch copies that only ONNX
            Runtime reads during verification skip it: fsync is most of their cost.

    The same model saved twice gives byte-identical files: the data file name is derived
    from the output name, and the temporary names never enter the content.

    Raises:
        OutputError: the target would overwrite the input, its folder is missing or not
            writable, it is a folder, the weights are too large to inline, or the write failed.
    """
    out = pathlib.Path(os.path.abspath(os.fspath(path)))
    parent = out.parent
    data_name = f"{out.name}.data"
    data_out = parent / data_name

    _check_output_folder(out)
    if opset is not None:
        converted, why = at_opset(model, opset)
        if converted is None:
            logger.warning("%s: written at opset %s, not %d: %s", out, _default_opset(dict(model.opset_imports)), opset, why)
        else:
            model = converted
    model_files = _external_files(model)
    # The pruned model reads nothing from the input's data files any more, but they are still
    # the input's: never write over them either.
    guarded = model_files | (_source_data_files(source_path) if source_path is not None else set())
    _check_not_overwriting(out, data_out, guarded, source_path, in_place)

    has_external = any(isinstance(t, ir.ExternalTensor) for t in _initializer_tensors(model))
    total = sum(t.nbytes for t in _initializer_tensors(model))
    if external_data is None:
        use_external = has_external or total >= EXTERNAL_DATA_THRESHOLD_BYTES
    else:
        use_external = external_data
    if not use_external and total >= EXTERNAL_DATA_THRESHOLD_BYTES:
        raise OutputError(f"{out}: {total / 2**30:.2f} GiB of weights is too large to store "
                          "inside the .onnx file; save with external data")

    try:
        tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".spa-tmp",
                                                dir=parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in {parent} ({_os_reason(exc)})") from exc
    wrote_data = False
    try:
        tmp_model = tmp_dir / out.name
        tmp_data = tmp_dir / data_name
        try:
            if use_external:
                ir.save(model, tmp_model, format="protobuf", external_data=data_name)
            else:
                _save_inline(model, tmp_model)
            wrote_data = use_external and tmp_data.exists() and tmp_data.stat().st_size > 0
            if durable:
                if wrote_data:
                    _fsync(tmp_data)
                _fsync(tmp_model)
            # Data first, model last: once the new .onnx is visible, its data is in place.
            if wrote_data:
                os.replace(tmp_data, data_out)
            os.replace(tmp_model, out)
            if durable:
                _fsync_dir(parent)
        except OSError as exc:
            raise OutputError(f"{out}: write failed ({_os_reason(exc)})") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    if wrote_data:
        _invalidate_tensors_on(model, data_out, model_files)
    logger.info("saved %s%s", out, f" (+ {data_name})" if wrote_data else "")
    return out


def at_opset(
    model: ir.Model,
    opset: int,
    *,
    reference: str | os.PathLike[str] | None = None,
    feeds: dict | None = None,
) -> tuple[ir.Model | None, str | None]:
    """A copy of ``model`` at default-domain ``opset`` (``--keep-opset``), or why not.

    Converted with ``upgrade_opset.downgrade_or_reason`` (onnx's version converter, then the
    relabelling it documents), then checked: the copy must load in ONNX Runtime and, given
    ``reference`` (a model file, e.g. the pruned model at the upgraded opset) and ``feeds``,
    give the same outputs (``upgrade_opset.check_upgrade``). Returns ``(copy, None)``, or
    ``(None, reason)`` where the converter cannot go back or a check fails: the caller then
    keeps the model at its own opset. Lazy external weights are not read: the copy holds the
    very same tensor objects. ``model`` itself at ``opset`` already is returned as it is.
    """
    current = _default_opset(dict(model.opset_imports))
    if current is None or current == opset:
        return model, None
    external = upgrade_opset.external_tensors(model)
    back, why = upgrade_opset.downgrade_or_reason(ir.to_proto(model), opset)
    if back is None:
        return None, f"the version converter cannot write opset {opset} ({why})"
    converted = ir.from_proto(back)
    del back
    upgrade_opset.carry_over(model, converted, external)
    from spa import verify  # late: verify imports planning, which the loading path must not

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="spa-opset-"))
    try:
        path = save_model(converted, tmp / "model.onnx", durable=False)
        try:
            verify.session(path, pruned=True)
        except SpaError as exc:  # VerificationError: "ONNX Runtime cannot load the pruned model: …"
            return None, f"at opset {opset}, {exc}"
        if reference is not None and feeds is not None:
            try:
                upgrade_opset.check_upgrade(path, reference, feeds)
            except SpaError as exc:
                return None, f"at opset {opset} its outputs differ from the opset-{current} model's ({exc})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return converted, None


def _check_output_folder(out: pathlib.Path) -> None:
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {parent} is not writable")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory")


def _check_not_overwriting(
    out: pathlib.Path,
    data_out: pathlib.Path,
    model_files: set[str],
    source_path: str | os.PathLike[str] | None,
    in_place: bool,
) -> None:
    for data_file in model_files:
        if _same_file(out, data_file):
            raise OutputError(f"{out}: is an external data file the model reads its weights from")
    if in_place:
        return
    if source_path is not None and (_same_file(out, source_path)
                                    or _same_file(data_out, source_path)):
        raise OutputError(f"{out}: would overwrite the input model (pass in_place to allow it)")
    for data_file in model_files:
        if _same_file(data_out, data_file):
            raise OutputError(f"{out}: would overwrite {data_file}, which the input model reads "
                              "its weights from (pass in_place to allow it)")


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Same file on disk (hard links, symlinks), or the same resolved path if one is absent."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


#: model file (real path) → ((mtime_ns, size), its external data files): filled when a model is
#: loaded, so that output checks know the input's data files without parsing it again.
_DATA_FILES: dict[str, tuple[tuple[int, int], frozenset[str]]] = {}


def _remember_data_files(abs_path: str, model: ir.Model | None) -> None:
    """``model``: the loaded model, None when it has no external data (nothing to walk)."""
    try:
        st = os.stat(abs_path)
    except OSError:
        return
    files = frozenset(_external_files(model)) if model is not None else frozenset()
    _DATA_FILES[os.path.realpath(abs_path)] = ((st.st_mtime_ns, st.st_size), files)


def _source_data_files(source_path: str | os.PathLike[str], *, parse: bool = True) -> set[str]:
    """The external data files of the model file ``source_path``: remembered at load, else (with
    ``parse``, and only for a regular file: never a FIFO or device) read from its protobuf
    without loading any weight."""
    key = os.path.realpath(source_path)
    try:
        st = os.stat(key)
    except OSError:
        return set()
    cached = _DATA_FILES.get(key)
    if cached is not None and cached[0] == (st.st_mtime_ns, st.st_size):
        return set(cached[1])
    if not parse or not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return set()
    try:
        proto = onnx.load(key, format="protobuf", load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model we could read: nothing of it to guard
        return set()
    base = os.path.dirname(key)
    files = set()
    for t in onnx.external_data_helper._get_all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc and "\0" not in loc:
                files.add(os.path.abspath(os.path.join(base, loc)))
    return files


def _graphs(model: ir.Model) -> list[ir.Graph]:
    """``model.graphs()`` (main graph, then bodies), without the recursive walk where no node
    holds a body."""
    return list(model.graphs()) if has_subgraphs(model.graph) else [model.graph]


def _initializer_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in _graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def _external_files(model: ir.Model) -> set[str]:
    """Absolute paths of every external data file the model's tensors read from."""
    return {
        os.path.abspath(t.path) for t in _all_tensors(model) if isinstance(t, ir.ExternalTensor)
    }


def _save_inline(model: ir.Model, tmp_model: pathlib.Path) -> None:
    """Save with every initializer inside the .onnx file, without leaving the model changed.

    ``ir.save`` without ``external_data`` would keep an external tensor's old relative
    location, which is wrong in any other folder, so such tensors are read into memory for
    the duration of the write and put back afterwards.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name,
                                                  dtype=tensor.dtype)
        ir.save(model, tmp_model, format="protobuf")
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _invalidate_tensors_on(model: ir.Model, data_out: pathlib.Path, model_files: set[str]) -> None:
    """Invalidate lazy tensors whose data file was just replaced (in-place saves).

    Their offsets describe the old file; a fresh mmap would read the new file at those
    offsets and silently return wrong weights. Invalidated tensors raise instead.
    """
    target = os.path.realpath(data_out)
    if not any(os.path.realpath(f) == target for f in model_files):
        return
    count = 0
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and os.path.realpath(tensor.path) == target:
            tensor.release()
            tensor.invalidate()
            count += 1
    logger.warning("%s was replaced: %d lazy tensors of the in-memory model read it and are now "
                   "invalid; reload the saved model to keep using it", data_out, count)


def _fsync(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: pathlib.Path) -> None:
    """Make the renames durable; not every platform can open a folder, so best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


def _root_cause(exc: BaseException) -> str:
    """The innermost message of a chain: onnx-ir wraps a failure in "Error calling
    _deserialize_graph with: …" once per level, which says nothing about the problem."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _os_reason(exc: OSError) -> str:
    return exc.strerror or _one_line(exc)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """Write a text file (report, plan, HTML) beside its target, then rename: a reader never
    sees half a file, and a failed write leaves nothing behind."""
    out = pathlib.Path(os.path.abspath(os.fspath(path)))
    _check_output_folder(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.spa-tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: write failed ({_os_reason(exc)})") from exc
    return out


def check_output_path(path: str | os.PathLike[str], *, source_path: str | os.PathLike[str] | None = None,
                      in_place: bool = False) -> pathlib.Path:
    """Refuse an output path before any work is done: a missing or unwritable folder, a
    directory, or the input itself (unless ``in_place``). Returns the absolute path."""
    out = pathlib.Path(os.path.abspath(os.fspath(path)))
    _check_output_folder(out)
    if not in_place and source_path is not None and os.path.exists(source_path) and _same_file(out, source_path):
        raise OutputError(f"{out}: would overwrite the input model (use --in-place)")
    if source_path is not None and os.path.exists(source_path):
        data_out = out.with_name(f"{out.name}.data")
        for data_file in _source_data_files(source_path, parse=False):  # known once loaded; save checks again
            if _same_file(out, data_file) or (not in_place and _same_file(data_out, data_file)):
                raise OutputError(f"{out}: would overwrite {data_file}, which the input model reads its weights from")
    return out
