"""SavedModels (TF Hub / Kaggle `google/mobilenet-v2`) and TF1 Hub modules, read without TensorFlow.

A SavedModel keeps its weights in an ordinary tensor bundle, `variables/variables.{index,data-*}`:
- written by TF1's builder (and TF1 Hub modules, which add `tfhub_module.pb`), the keys are the graph's
  variable names, e.g. `MobilenetV2/Conv/weights`;
- written by `tf.saved_model.save` (TF2), the keys are object-graph paths such as
  `variables/0/.ATTRIBUTES/VARIABLE_VALUE`, and a string tensor `_CHECKPOINTABLE_OBJECT_GRAPH` holds a
  `TrackableObjectGraph` whose `SerializedTensor`s map each checkpoint key to the variable's full name.
Either way the reader yields the full names, with any scope in front of `MobilenetV2/` (a module's or a
wrapper's) removed, so the pipeline sees the slim names. The graph itself (`saved_model.pb`) is run only
by the verifier, which runs the SavedModel's serving signature as the reference; the reader only looks at
its node names for TF Hub's `hub_input` scope, where a Hub model scales its [0, 1] images to [-1, 1], to
say so in the record (the converted model takes [-1, 1] itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from converter.errors import CheckpointFormatError, SourceError
from converter.formats import protobuf
from converter.formats.base import Hints, Reader, References
from converter.formats.tf_bundle import TensorBundle

SAVED_MODEL_PB = "saved_model.pb"
HUB_MODULE_PB = "tfhub_module.pb"
VARIABLES_PREFIX = Path("variables") / "variables"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE = "VARIABLE_VALUE"
SLIM_ROOT = "MobilenetV2/"
# Every slim and DeepLab checkpoint has this variable; whatever stands before it is a scope to remove.
ANCHOR = "MobilenetV2/Conv/weights"
#: The name scope in which TF Hub's image models scale their [0, 1] input to [-1, 1].
HUB_INPUT_SCOPE = "hub_input"


def object_graph_names(serialized: bytes) -> dict[str, str]:
    """checkpoint key -> variable full name, from a serialized `TrackableObjectGraph`.

    trackable_object_graph.proto: TrackableObjectGraph.nodes = 1 (TrackableObject); TrackableObject
    .attributes = 2 (SerializedTensor); SerializedTensor.name = 1, .full_name = 2, .checkpoint_key = 3.
    """
    names: dict[str, str] = {}
    for field, wire, node in protobuf.fields(serialized):
        if field != 1:
            continue
        node = protobuf.expect_bytes(wire, node, "object graph node")
        for node_field, node_wire, attribute in protobuf.fields(node):
            if node_field != 2:
                continue
            attribute = protobuf.expect_bytes(node_wire, attribute, "object graph attribute")
            values: dict[int, str] = {}
            for number, attribute_wire, value in protobuf.fields(attribute):
                if number in (1, 2, 3):
                    text = protobuf.expect_bytes(attribute_wire, value, "object graph attribute string")
                    try:
                        values[number] = text.decode("utf-8")
                    except UnicodeDecodeError:
                        raise protobuf.MalformedMessage("an object graph name is not UTF-8") from None
            if values.get(1) == VARIABLE_VALUE and values.get(3):
                names[values[3]] = values.get(2) or values[3]
    return names


def node_names(serialized: bytes) -> Iterator[str]:
    """The name of every node of a serialized SavedModel, in its graphs and their functions' bodies.

    saved_model.proto: SavedModel.meta_graphs = 2; MetaGraphDef.graph_def = 2; graph.proto: GraphDef.node = 1,
    .library = 2; function.proto: FunctionDefLibrary.function = 1, FunctionDef.node_def = 3; NodeDef.name = 1.
    """
    for meta_graph in _submessages(serialized, 2, "meta graph"):
        for graph in _submessages(meta_graph, 2, "graph"):
            nodes = list(_submessages(graph, 1, "node"))
            for library in _submessages(graph, 2, "function library"):
                for function in _submessages(library, 1, "function"):
                    nodes += _submessages(function, 3, "function node")
            for node in nodes:
                for name in _submessages(node, 1, "node name"):
                    yield name.decode("utf-8", "replace")


def _submessages(serialized: bytes, number: int, what: str) -> Iterator[bytes]:
    for field, wire, value in protobuf.fields(serialized):
        if field == number:
            yield protobuf.expect_bytes(wire, value, what)


class SavedModelReader(Reader):
    format = "saved-model"
    description = "SavedModel folder or .tar.gz (saved_model.pb + variables/; TF Hub / Kaggle, TF1 or TF2)"
    marker = SAVED_MODEL_PB

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_dir() and (path / cls.marker).is_file()

    def __init__(self, path: Path, archive: Path | None = None, *, backbone_only: bool = False) -> None:
        super().__init__(path, archive, backbone_only=backbone_only)
        prefix = path / VARIABLES_PREFIX
        if not Path(f"{prefix}.index").is_file():
            raise SourceError(
                f"{archive or path} has {self.marker} but no {VARIABLES_PREFIX}.index: a SavedModel without "
                "variables holds no weights to convert (frozen into constants?)"
            )
        self.bundle = TensorBundle(prefix)
        self.keys = self._slim_names(self._full_names())
        self.has_hub_input = self._has_hub_input()

    def _has_hub_input(self) -> bool:
        """Whether a node of the graph is in TF Hub's `hub_input` scope (any scope in front). A graph that
        cannot be parsed is the verifier's to refuse: conversion needs only the variables."""
        try:
            names = list(node_names((self.path / SAVED_MODEL_PB).read_bytes()))
        except (OSError, protobuf.MalformedMessage):
            return False
        return any(HUB_INPUT_SCOPE in name.split("/")[:-1] for name in names)

    def _full_names(self) -> dict[str, str]:
        """full name -> checkpoint key, for every stored tensor but the object graph itself."""
        stored = self.bundle.names()
        if OBJECT_GRAPH_KEY not in stored:
            return {key: key for key in stored}
        serialized = self.bundle.read_strings(OBJECT_GRAPH_KEY)
        try:
            if len(serialized) != 1:
                raise protobuf.MalformedMessage(f"{len(serialized)} object graphs instead of one")
            by_key = object_graph_names(serialized[0])
        except protobuf.MalformedMessage as error:
            raise CheckpointFormatError(f"{self.source_name}: its object graph is damaged ({error})") from None
        unnamed = sorted(key for key in stored if key != OBJECT_GRAPH_KEY and key not in by_key)
        if unnamed:
            raise CheckpointFormatError(
                f"{self.source_name}: {len(unnamed)} stored tensors are not in its object graph, e.g. "
                f"{', '.join(unnamed[:3])}; the SavedModel is damaged"
            )
        full_names = {by_key[key]: key for key in stored if key != OBJECT_GRAPH_KEY}
        if len(full_names) != len(stored) - 1:
            raise CheckpointFormatError(f"{self.source_name}: two of its variables have the same name")
        return full_names

    def _slim_names(self, full_names: dict[str, str]) -> dict[str, str]:
        """Remove the scope that stands before the slim names (a module's `module/`, a wrapper's, ...)."""
        scopes = {name[: -len(ANCHOR)] for name in full_names if name.endswith(ANCHOR)}
        if len(scopes) != 1:
            raise SourceError(
                f"{self.source_name} is a SavedModel, but {'none' if not scopes else 'several'} of its "
                f"variables is {ANCHOR!r} (found {len(full_names)} variables, e.g. "
                f"{', '.join(sorted(full_names)[:3])}): is it a slim MobileNetV2? Keras SavedModels are "
                "read from their .h5 / .keras files instead"
            )
        (scope,) = scopes
        return {name.removeprefix(scope): key for name, key in full_names.items()}

    def names(self) -> list[str]:
        return sorted(self.keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.bundle.info(self.keys[name]).shape

    def read(self, name: str) -> np.ndarray:
        return self.bundle.read(self.keys[name])

    def source_files(self) -> list[Path]:
        variables = self.path / VARIABLES_PREFIX.parent
        return [self.path / self.marker, *sorted(p for p in variables.iterdir() if p.name.startswith("variables."))]

    @property
    def references(self) -> References:
        return References(saved_model=self.path)

    @property
    def hints(self) -> Hints:
        notes = [
            "a SavedModel holds one value per variable; whether the exporter took the raw values or "
            "their moving averages is not recorded in the file"
        ]
        if self.has_hub_input:
            notes.append(
                f"its graph scales its input in a {HUB_INPUT_SCOPE} scope, as TF Hub's image models take images "
                "in [0, 1] and scale them to [-1, 1] inside; the converted model takes [-1, 1] (as its "
                "preprocessor_config.json prepares)"
            )
        return Hints(convention="as exported", notes=tuple(notes))

    def close(self) -> None:
        self.bundle.close()


class HubModuleReader(SavedModelReader):
    format = "tf-hub-module"
    description = "TF1 Hub module folder or .tar.gz (tfhub_module.pb + saved_model.pb + variables/)"
    marker = HUB_MODULE_PB

    def source_files(self) -> list[Path]:
        return [self.path / SAVED_MODEL_PB, *super().source_files()]
