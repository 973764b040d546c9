"""The reference: the ORIGINAL the model was converted from, run by its own runtime.

One module per backend, found through `REFERENCES`: a row names the reference kind, the field of the
source's :class:`~converter.formats.base.References` that carries the original, and the function that
opens it. ``--reference auto`` takes the first row whose original the source carries, so a SavedModel,
a ``.tflite`` or a Keras file is its own reference, and a TF checkpoint's is its ``.meta`` graph, else its
frozen graph, else a graph built by the caller's builder (:mod:`.graph`). A named kind takes its row.

TensorFlow (and Keras) are imported lazily: only when a reference is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from converter.errors import VerificationError
from converter.formats.base import References
from converter.verify.references import graph, keras, savedmodel, tflite
from converter.verify.references.base import (
    AUTO,
    BUILDER,
    FROZEN_GRAPH,
    KERAS,
    LOGITS_TENSOR,
    META_GRAPH,
    REFERENCE_KINDS,
    SAVED_MODEL,
    TFLITE,
    BaseReference,
    GraphBuilder,
    ReferenceRequest,
    import_tensorflow,
    quiet_framework,
)

__all__ = [
    "LOGITS_TENSOR",
    "REFERENCES",
    "REFERENCE_KINDS",
    "BaseReference",
    "GraphBuilder",
    "import_tensorflow",
    "open_reference",
]


@dataclass(frozen=True)
class Backend:
    kind: str  # the ReferenceInfo kind (and --reference's name for a checkpoint's graphs)
    carried_by: str  # the References field that holds the original
    open: Callable[..., BaseReference]  # (tf, source References, ReferenceRequest) -> the reference
    lacking: str  # why there is none when the source does not carry it
    runs: str  # what the reports and the model card say was run


#: Every reference, in the order ``auto`` prefers them.
REFERENCES: tuple[Backend, ...] = (
    Backend(
        SAVED_MODEL,
        "saved_model",
        savedmodel.open_saved_model,
        "the source is not a SavedModel",
        "the SavedModel's signature, run by TensorFlow",
    ),
    Backend(
        TFLITE,
        "tflite_file",
        tflite.open_tflite,
        "the source is not a .tflite file",
        "the .tflite file, run by TensorFlow Lite's interpreter",
    ),
    Backend(
        KERAS,
        "keras_file",
        keras.open_keras,
        "the source is not a Keras file",
        "the Keras file, loaded and run by Keras",
    ),
    Backend(
        META_GRAPH,
        "meta_graph",
        graph.open_meta_graph,
        "the checkpoint comes without a .meta graph",
        "the checkpoint's own .meta graph, run by TensorFlow",
    ),
    Backend(
        FROZEN_GRAPH,
        "frozen_graph",
        graph.open_frozen_graph,
        "the checkpoint comes without a frozen graph",
        "the checkpoint's frozen graph, run by TensorFlow",
    ),
    Backend(
        BUILDER,
        "checkpoint_prefix",
        graph.open_builder,
        "the source is not a TF checkpoint",
        "the checkpoint restored into a slim graph built for it, run by TensorFlow",
    ),
)


def open_reference(
    source: References,
    *,
    kind: str,
    depth: float,
    convention: str,
    tensors: Sequence[str],
    output_stride: int | None = None,
    threads: int | None = None,
    prefer: str = AUTO,
    image_size: int = 224,
    graph_builder: GraphBuilder | None = None,
) -> BaseReference:
    """The reference for `source` (the originals a reader found), holding the endpoint `tensors` it can;
    the other arguments are those of :class:`~converter.verify.references.base.ReferenceRequest`."""
    request = ReferenceRequest(
        kind, depth, convention, tuple(tensors), output_stride, threads, prefer, image_size, graph_builder
    )
    tf = import_tensorflow()
    backend = _backend(source, prefer)
    with quiet_framework():  # TFLite's interpreter and Keras announce themselves on loading
        reference = backend.open(tf, source, request)
    reference.info.description = backend.runs
    return reference


def _backend(source: References, prefer: str) -> Backend:
    if prefer == AUTO:
        carried = [backend for backend in REFERENCES if getattr(source, backend.carried_by) is not None]
        if not carried:
            raise VerificationError("no reference: the source carries no original to run; use a TF source")
        return carried[0]
    backend = next((backend for backend in REFERENCES if backend.kind == prefer), None)
    if backend is None:
        raise VerificationError(f"unknown reference {prefer!r}; use one of {', '.join(REFERENCE_KINDS)}")
    if getattr(source, backend.carried_by) is None:
        raise VerificationError(f"no reference for --reference {prefer}: {backend.lacking}; use --reference auto")
    return backend
