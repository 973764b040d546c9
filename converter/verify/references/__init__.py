"""The reference: the ORIGINAL the model was converted from, run by its own runtime.

One module per backend. Each declares ``BACKENDS``: the reference kind, the name under which a source's
:class:`~converter.formats.base.References` carry the original it runs, and the function that opens it.
`REFERENCES` gathers them from every module of this package, so a new backend is one new module.
``--reference auto`` takes the first backend whose original the source carries (a source carries one
kind of original, except a TF checkpoint, whose module orders its ``.meta`` graph, frozen graph and the
caller's builder, :mod:`.graph`). A named kind takes its backend.

TensorFlow (and Keras) are imported lazily: only when a reference is opened.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from converter.errors import VerificationError
from converter.formats.base import References
from converter.verify.references.base import (
    LOGITS_TENSOR,
    Backend,
    BaseReference,
    GraphBuilder,
    ReferenceRequest,
    import_tensorflow,
    quiet_framework,
)
from converter.vocabulary import AUTO, REFERENCE_KINDS

__all__ = [
    "LOGITS_TENSOR",
    "REFERENCES",
    "REFERENCE_KINDS",
    "BaseReference",
    "GraphBuilder",
    "import_tensorflow",
    "open_reference",
]


def _declared_backends() -> tuple[Backend, ...]:
    """Every module's ``BACKENDS``, modules in name order (the shared ones declare none)."""
    backends: list[Backend] = []
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        backends += getattr(importlib.import_module(f"{__name__}.{module}"), "BACKENDS", ())
    return tuple(backends)


#: Every reference backend.
REFERENCES: tuple[Backend, ...] = _declared_backends()


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
        carried = [backend for backend in REFERENCES if backend.carried_by in source]
        if not carried:
            raise VerificationError("no reference: the source carries no original to run; use a TF source")
        return carried[0]
    backend = next((backend for backend in REFERENCES if backend.kind == prefer), None)
    if backend is None:
        raise VerificationError(f"unknown reference {prefer!r}; use one of {', '.join(REFERENCE_KINDS)}")
    if backend.carried_by not in source:
        raise VerificationError(f"no reference for --reference {prefer}: {backend.lacking}; use --reference auto")
    return backend
