"""SavedModels (TF Hub / Kaggle `google/mobilenet-v2`) and TF1 Hub modules, read without TensorFlow.

A SavedModel keeps its weights in an ordinary tensor bundle, `variables/variables.{index,data-*}`:
- written by TF1's builder (and TF1 Hub modules, which add `tfhub_module.pb`), the keys are the graph's
  variable names, e.g. `MobilenetV2/Conv/weights`;
- written by `tf.saved_model.save` (TF2), the keys are object-graph paths such as
  `variables/0/.ATTRIBUTES/VARIABLE_VALUE`, and a string tensor `_CHECKPOINTABLE_OBJECT_GRAPH` holds a
  `TrackableObjectGraph` whose `SerializedTensor`s map each checkpoint key to the variable's full name.
Either way the reader yields the full names, with any scope in front of `MobilenetV2/` (a module's or a
wrapper's) removed, so the pipeline sees the slim names. A SavedModel Keras wrote (Keras 3's `export()` or
`tf.saved_model.save`, tf_keras' `save_format="tf"`) has no slim name: its variables are grouped into Keras
layers through the object graph (:func:`keras_layers`) and mapped as the Keras reader maps an `.h5` file.
The graph itself (`saved_model.pb`) is run only by the verifier, which runs the SavedModel's serving
signature as the reference; the reader only looks at its node names for TF Hub's `hub_input` scope, where
a Hub model scales its [0, 1] images to [-1, 1], to say so in the record (the converted model takes
[-1, 1] itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.errors import CheckpointFormatError, KerasFileError, SourceError
from converter.formats import keras, protobuf
from converter.formats.base import Hints, Reader, References
from converter.formats.labels_file import teachable_machine_labels
from converter.formats.sniffing import HUB_MODULE_PB, SAVED_MODEL_PB
from converter.formats.tf_bundle import TensorBundle

VARIABLES_PREFIX = Path("variables") / "variables"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE = "VARIABLE_VALUE"
SLIM_ROOT = "MobilenetV2/"
# Every slim and DeepLab checkpoint has this variable; whatever stands before it is a scope to remove.
ANCHOR = "MobilenetV2/Conv/weights"
#: The name scope in which TF Hub's image models scale their [0, 1] input to [-1, 1].
HUB_INPUT_SCOPE = "hub_input"
# tf_keras' SavedMetadata: nodes (field 1), each with its path (3: b"root" for the model) and JSON metadata (5).
KERAS_METADATA = "keras_metadata.pb"
METADATA_PATH, METADATA_JSON = 3, 5


@dataclass(frozen=True)
class GraphVariable:
    """A variable of a TF2 object graph: where the walk from the root first reached it, its full name (a
    Keras layer path such as `Conv1/kernel`, or a bare `kernel`), and its checkpoint key."""

    path: tuple[str, ...]
    full_name: str
    key: str


def object_graph_variables(serialized: bytes) -> list[GraphVariable]:
    """The variables of a serialized `TrackableObjectGraph`, in the order a breadth-first walk from the root
    (node 0) reaches them, each by its shortest path.

    trackable_object_graph.proto: TrackableObjectGraph.nodes = 1 (TrackableObject); TrackableObject
    .children = 1 (ObjectReference: node_id = 1, local_name = 2), .attributes = 2 (SerializedTensor);
    SerializedTensor.name = 1, .full_name = 2, .checkpoint_key = 3.
    """
    nodes = [_graph_node(node) for node in _submessages(serialized, 1, "object graph node")]
    paths: dict[int, tuple[str, ...]] = {0: ()} if nodes else {}
    order, found = [0] if nodes else [], []
    for node_id in order:  # grows as the walk goes
        children, attributes = nodes[node_id]
        found += [GraphVariable(paths[node_id], full_name or key, key) for full_name, key in attributes]
        for child, local_name in children:
            if child >= len(nodes):
                raise protobuf.MalformedMessage(f"a child refers to node {child} of {len(nodes)}")
            if child not in paths:
                paths[child] = (*paths[node_id], local_name)
                order.append(child)
    # Objects no child edge reaches (an optimizer's slot variables) are listed by their checkpoint keys.
    for node_id, (_, attributes) in enumerate(nodes):
        if node_id not in paths:
            found += [GraphVariable((), full_name or key, key) for full_name, key in attributes]
    return found


def _graph_node(node: bytes) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """(children as (node id, local name), variables as (full name, checkpoint key)) of one object."""
    children, attributes = [], []
    for child in _submessages(node, 1, "object graph child"):
        values = _fields_of(child, (1, 2))
        node_id, local_name = values.get(1, 0), values.get(2, "")
        if not isinstance(node_id, int) or not isinstance(local_name, str):
            raise protobuf.MalformedMessage("an object graph child is not a node id and a name")
        children.append((node_id, local_name))
    for attribute in _submessages(node, 2, "object graph attribute"):
        values = _fields_of(attribute, (1, 2, 3))
        if not all(isinstance(value, str) for value in values.values()):
            raise protobuf.MalformedMessage("an object graph attribute holds a number where a name belongs")
        if values.get(1) == VARIABLE_VALUE and values.get(3):
            attributes.append((str(values.get(2, "")), str(values[3])))
    return children, attributes


def _fields_of(message: bytes, numbers: tuple[int, ...]) -> dict[int, int | str]:
    """The fields `numbers` of a message, varints as ints and strings decoded."""
    values: dict[int, int | str] = {}
    for number, _wire, value in protobuf.fields(message):
        if number not in numbers:
            continue
        if isinstance(value, int):
            values[number] = value
            continue
        try:
            values[number] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise protobuf.MalformedMessage("an object graph name is not UTF-8") from None
    return values


def object_graph_names(serialized: bytes) -> dict[str, str]:
    """checkpoint key -> variable full name, from a serialized `TrackableObjectGraph`."""
    return {variable.key: variable.full_name for variable in object_graph_variables(serialized)}


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
    marker = SAVED_MODEL_PB  # the file that makes the folder one

    def __init__(self, path: Path, archive: Path | None = None, *, backbone_only: bool = False) -> None:
        super().__init__(path, archive, backbone_only=backbone_only)
        prefix = path / VARIABLES_PREFIX
        if not Path(f"{prefix}.index").is_file():
            raise SourceError(
                f"{archive or path} has {self.marker} but no {VARIABLES_PREFIX}.index: a SavedModel without "
                "variables holds no weights to convert (frozen into constants?)"
            )
        self.bundle = TensorBundle(prefix)
        self.keras_notes: list[str] = []
        variables = self._variables()
        slim = any(variable.full_name.endswith(ANCHOR) for variable in variables)
        # name -> (checkpoint key or stored value, shape)
        self.tensors: dict[str, tuple[object, tuple[int, ...]]]
        if slim or not any(variable.path for variable in variables):
            self.tensors = self._slim_tensors(variables)
        else:
            self.tensors = self._keras_tensors(variables, backbone_only)
        self.is_keras = not slim
        self.has_hub_input = self._has_hub_input()

    def _has_hub_input(self) -> bool:
        """Whether a node of the graph is in TF Hub's `hub_input` scope (any scope in front). A graph that
        cannot be parsed is the verifier's to refuse: conversion needs only the variables."""
        try:
            names = list(node_names((self.path / SAVED_MODEL_PB).read_bytes()))
        except (OSError, protobuf.MalformedMessage):
            return False
        return any(HUB_INPUT_SCOPE in name.split("/")[:-1] for name in names)

    def _variables(self) -> list[GraphVariable]:
        """Every stored tensor but the object graph itself: a TF1 SavedModel's by its graph names, a TF2
        one's as its object graph places and names it."""
        stored = self.bundle.names()
        if OBJECT_GRAPH_KEY not in stored:
            return [GraphVariable((), key, key) for key in stored]
        serialized = self.bundle.read_strings(OBJECT_GRAPH_KEY)
        try:
            if len(serialized) != 1:
                raise protobuf.MalformedMessage(f"{len(serialized)} object graphs instead of one")
            variables = object_graph_variables(serialized[0])
        except protobuf.MalformedMessage as error:
            raise CheckpointFormatError(f"{self.source_name}: its object graph is damaged ({error})") from None
        keys = {variable.key for variable in variables}
        unnamed = sorted(key for key in stored if key != OBJECT_GRAPH_KEY and key not in keys)
        if unnamed:
            raise CheckpointFormatError(
                f"{self.source_name}: {len(unnamed)} stored tensors are not in its object graph, e.g. "
                f"{', '.join(unnamed[:3])}; the SavedModel is damaged"
            )
        return [variable for variable in variables if variable.key in stored]

    def _slim_tensors(self, variables: list[GraphVariable]) -> dict[str, tuple[object, tuple[int, ...]]]:
        """The slim names, with the scope that stands before them (a module's `module/`, a wrapper's, ...)
        removed."""
        full_names = {variable.full_name: variable.key for variable in variables}
        if len(full_names) != len(variables):
            raise CheckpointFormatError(f"{self.source_name}: two of its variables have the same name")
        scopes = {name[: -len(ANCHOR)] for name in full_names if name.endswith(ANCHOR)}
        if len(scopes) != 1:
            raise SourceError(
                f"{self.source_name} is a SavedModel, but {'none' if not scopes else 'several'} of its "
                f"variables is {ANCHOR!r} (found {len(full_names)} variables, e.g. "
                f"{', '.join(sorted(full_names)[:3])}): is it a slim MobileNetV2? A Keras SavedModel is read "
                "through its object graph, which this one lacks"
            )
        (scope,) = scopes
        return {name.removeprefix(scope): (key, self.bundle.info(key).shape) for name, key in full_names.items()}

    def _keras_tensors(
        self, variables: list[GraphVariable], backbone_only: bool
    ) -> dict[str, tuple[object, tuple[int, ...]]]:
        """A SavedModel Keras wrote: its variables grouped into layers (:func:`keras_layers`) fill the
        Keras MobileNetV2 as the Keras reader fills it from an .h5 file."""
        try:
            backbone, head = keras.assign_layers(keras_layers(variables, self.bundle))
        except KerasFileError as error:
            raise KerasFileError(f"{self.source_name} (a Keras SavedModel): {error}") from None
        # tf_keras keeps the model config in keras_metadata.pb; without it (Keras 3), the head's activations
        # are unknown, so only a single Dense layer (the classifier) maps.
        self.keras_config = keras.ConfigFacts(self._keras_model_config(), len(keras.BACKBONE))
        head, activations, notes = keras.checked_head(self.source_name, head, self.keras_config, backbone_only)
        self.keras_notes += notes
        self.hidden_activations = activations[:-1]
        self.num_classes = int(head[-1].weights["kernel"].shape[1]) if head else None
        return keras.slim_tensors(backbone, head)

    def _keras_model_config(self) -> dict | None:
        """The model config that tf_keras keeps in keras_metadata.pb (its root object's metadata), if any."""
        path = self.path / KERAS_METADATA
        if not path.is_file():
            return None
        try:
            for field, wire, node in protobuf.fields(path.read_bytes()):
                if field != 1:
                    continue
                node = protobuf.expect_bytes(wire, node, "a node")
                values = {number: (kind, value) for number, kind, value in protobuf.fields(node)}
                if values.get(METADATA_PATH, (None, None))[1] == b"root" and METADATA_JSON in values:
                    text = protobuf.expect_bytes(*values[METADATA_JSON], "the metadata")
                    metadata = json.loads(text, object_hook=_tuple_as_list)
                    return metadata.get("model_config") if isinstance(metadata, dict) else None
        except (OSError, protobuf.MalformedMessage, ValueError) as error:
            raise CheckpointFormatError(f"{self.source_name}: its {KERAS_METADATA} is damaged ({error})") from None
        return None

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name][1])

    def read(self, name: str) -> np.ndarray:
        stored, shape = self.tensors[name]
        values = self.bundle.read(stored) if isinstance(stored, str) else np.asarray(stored[()])
        return values.reshape(shape)

    def source_files(self) -> list[Path]:
        variables = self.path / VARIABLES_PREFIX.parent
        return [self.path / self.marker, *sorted(p for p in variables.iterdir() if p.name.startswith("variables."))]

    @property
    def references(self) -> References:
        return References(saved_model=self.path)

    @property
    def hints(self) -> Hints:
        if self.is_keras:
            notes = ["Keras stores plain (raw, non-EMA) values; Keras MobileNetV2 expects inputs x / 127.5 - 1."]
            labels, preprocessing = None, None
            if self.num_classes is not None:  # Teachable Machine's model.savedmodel/ beside its labels.txt
                size = self.keras_config.image_size or keras.DEFAULT_SIZE
                labels, label_notes, preprocessing = teachable_machine_labels(self.path, self.num_classes, size, None)
                notes += label_notes
            return Hints(
                image_size=self.keras_config.image_size,
                convention="raw",
                labels=labels,
                preprocessing=preprocessing,
                hidden_activations=self.hidden_activations,
                strided_padding=self.keras_config.strided_padding,
                notes=tuple(notes + self.keras_notes),
            )
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


@dataclass(frozen=True)
class StoredTensor:
    """A variable of the bundle, read when its value is needed (as the Keras reader's HDF5 datasets are)."""

    bundle: TensorBundle
    key: str
    shape: tuple[int, ...]

    def __getitem__(self, index) -> np.ndarray:
        return self.bundle.read(self.key)[index]


def keras_layers(variables: list[GraphVariable], bundle: TensorBundle) -> list[keras.Layer]:
    """The weighted Keras layers of a SavedModel's variables, in network order.

    A variable's layer is its full name's scope, as Keras names variables by layer path (`block_1_expand/
    kernel`), or for a bare name (`kernel`) the object holding it in the object graph; its role is the
    name's last part (Keras 3 keeps a conv kernel as `_kernel`, tf_keras a depthwise one as
    `depthwise_kernel`). Layers come in the order the object graph's walk first reaches them: Keras'
    layer lists (`layer_with_weights-N`, `_operations/N`, `variables/N`) are in network order. Keras 3's
    `export()` tracks each variable twice (`variables/`, `_all_variables/`): the first is kept."""
    layers: dict[str, keras.Layer] = {}
    kept: dict[str, GraphVariable] = {}
    for variable in variables:
        if variable.full_name in kept:
            first = kept[variable.full_name]
            if bundle.info(first.key).shape != bundle.info(variable.key).shape:
                raise KerasFileError(f"two variables named {variable.full_name} differ in shape")
            continue
        kept[variable.full_name] = variable
        scope, _, role = variable.full_name.rpartition("/")
        if not scope:
            scope = "/".join(variable.path[:-1])
        role = role.lstrip("_")
        role = "kernel" if role == "depthwise_kernel" else role
        layer = layers.setdefault(scope, keras.Layer(scope.rpartition("/")[2] or None, "", scope))
        if role in layer.weights:
            raise KerasFileError(f"layer {scope} holds two variables {role}")
        layer.weights[role] = StoredTensor(bundle, variable.key, bundle.info(variable.key).shape)
    for layer in layers.values():
        layer.keras_class = keras.class_from_weights(layer.weights)
    return list(layers.values())


class HubModuleReader(SavedModelReader):
    marker = HUB_MODULE_PB

    def source_files(self) -> list[Path]:
        return [self.path / SAVED_MODEL_PB, *super().source_files()]


def _tuple_as_list(value: dict) -> object:
    """tf_keras' metadata writes a tuple (an input shape) as {"class_name": "__tuple__", "items": [...]}; the
    .h5 model config, which the Keras reader reads, as a list."""
    return value["items"] if value.get("class_name") == "__tuple__" and "items" in value else value
