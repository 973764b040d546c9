"""Keras MobileNetV2 files, read with h5py alone (no TensorFlow, no Keras).

Four containers hold the same weights:

* legacy HDF5 (``model.save_weights("x.h5")`` in tf.keras 2.x, ``model.save("x.h5")`` in both): layer
  groups listed by the ``layer_names`` attribute (at the root, or under ``model_weights/`` in full-model
  files), each with a ``weight_names`` attribute; long lists are split into ``layer_names0``, ``...1``.
  tf.keras names weights ``Conv1/kernel:0`` and depthwise kernels ``depthwise_kernel``; Keras 3 drops
  ``:0`` and calls every kernel ``kernel``. A nested base model is one group holding all its weights.
* Keras 3 ``.weights.h5``: ``layers/<class>_<counter>/vars/<i>``, where the counter runs over the layers
  of that class in their container, in the model's layer order; nested models add ``layers/...`` levels.
  Recent writers put the layer's name in the ``name`` attribute of ``vars``.
* ``.keras``: a zip of ``config.json`` (the architecture) and ``model.weights.h5`` (as above).
* sharded ``.weights.json``: an index mapping each ``vars`` path to the shard files holding it.

Keras loads legacy files by layer position and ``.weights.h5`` by class and counter, never by layer
name; this reader does the same: the weighted layers of each class, in order, fill the 104 layers of the
MobileNetV2 backbone (its known sequence of Conv2D / DepthwiseConv2D / BatchNormalization), shapes are
checked link by link, and names, where the file has them, must not contradict the position (both the
2018 names of the published ImageNet files and today's). What follows the backbone is the head: nothing
(``include_top=False``), or one Dense layer (the ImageNet classifier, or a fine-tuned one).

Everything is treated as hostile: links other than hard links, external or virtual datasets, non-float
dtypes and shapes that do not chain are refused before any value is read, and global heap collections
(HDF5's store of the names) that do not hold together before any name is read.

The head is read as it comes: a short stack of Dense layers, with or without biases, on globally averaged
features, each with the ReLU or linear activation its config gives (Dropout left out, a final softmax
noted). A Dense without a bias gets a zero one (the same function), so a single Dense stays transformers'
classifier. Where a weights-only file holds several Dense layers, their activations are unknown and the
head is refused. Class names come from ``labels.txt`` next to the file (Teachable Machine's export).
"""

from __future__ import annotations

import io
import mmap
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import KerasFileError, KerasHeadError
from converter.formats.base import Hints, Reader, References
from converter.formats.keras_config import (
    BATCHNORM,
    CONV,
    DENSE,
    DEPTHWISE,
    MODEL_NAME,
    ConfigFacts,
    class_labels,
)
from converter.formats.keras_hdf5 import (
    MAX_ARCHIVE_MEMBER_BYTES,
    MAX_CONFIG_BYTES,
    check_global_heaps,
    checked_child,
    checked_dataset,
    first_line,
    is_group,
    parse_json,
    read_limited,
    read_member,
    string_list,
    text_attribute,
)
from converter.formats.labels_file import teachable_machine_labels
from converter.formats.sniffing import KERAS_ARCHIVE_MEMBERS, SHARD_INDEX_SUFFIX
from converter.slim import HEADS, HIDDEN_HEADS, LAYER_PARAMS, MAX_HEAD_LAYERS, NUM_BLOCKS
from converter.vocabulary import CLASSIFICATION

# What h5py raises for damaged files (HDF5's errors, mapped onto Python's by kind).
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)

# The variables of each layer class, in Keras' order (which is also the order of ``vars/0..``).
ROLES = {
    CONV: ("kernel",),
    DEPTHWISE: ("kernel",),
    BATCHNORM: ("gamma", "beta", "moving_mean", "moving_variance"),
    DENSE: ("kernel", "bias"),
}
BN_SUFFIXES = dict(zip(ROLES[BATCHNORM], (tf for tf, _ in LAYER_PARAMS), strict=True))
HEAD_WEIGHTS, HEAD_BIASES = (tf for tf, _, _, kind in HEADS if kind == CLASSIFICATION)
HIDDEN_WEIGHTS, HIDDEN_BIASES = (tf for tf, _, _ in HIDDEN_HEADS)
DEFAULT_SIZE = 224  # what the converter assumes when nothing says the input size
ZOO_FILE = re.compile(r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_(?P<alpha>[\d.]+)_(?P<rows>\d+)")


@dataclass(frozen=True)
class Slot:
    """One weighted layer of the backbone: slim scope, Keras class and its names (today, 2018)."""

    scope: str
    keras_class: str
    names: tuple[str, str]


def _backbone_slots() -> list[Slot]:
    """The 104 weighted backbone layers in network order (each conv followed by its BatchNorm)."""
    convs = [("MobilenetV2/Conv", CONV, "Conv1", "Conv1", "bn_Conv1", "bn_Conv1")]
    for part, cls in (("depthwise", DEPTHWISE), ("project", CONV)):
        bn = "bn_depthwise" if part == "depthwise" else "bn_project"
        convs.append(
            (f"MobilenetV2/expanded_conv/{part}", cls, f"expanded_conv_{part}", f"mobl0_conv_0_{part}",
             f"expanded_conv_{part}_BN", f"bn0_conv_0_{bn}")
        )  # fmt: skip
    for k in range(1, NUM_BLOCKS + 1):
        for part, cls in (("expand", CONV), ("depthwise", DEPTHWISE), ("project", CONV)):
            convs.append(
                (f"MobilenetV2/expanded_conv_{k}/{part}", cls, f"block_{k}_{part}", f"mobl{k}_conv_{k}_{part}",
                 f"block_{k}_{part}_BN", f"bn{k}_conv_{k}_bn_{part}")
            )  # fmt: skip
    convs.append(("MobilenetV2/Conv_1", CONV, "Conv_1", "Conv_1", "Conv_1_bn", "Conv_1_bn"))
    slots = []
    for scope, cls, name, name_2018, bn_name, bn_name_2018 in convs:
        slots += [Slot(scope, cls, (name, name_2018)), Slot(f"{scope}/BatchNorm", BATCHNORM, (bn_name, bn_name_2018))]
    return slots


BACKBONE = _backbone_slots()
KNOWN_NAMES = {name: i for i, slot in enumerate(BACKBONE) for name in slot.names} | {"predictions": -1, "Logits": -1}


@dataclass
class Layer:
    """A weighted layer as stored: its name where known, class, and datasets by role."""

    name: str | None
    keras_class: str
    where: str
    weights: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        shapes = ", ".join(f"{role} {list(ds.shape)}" for role, ds in self.weights.items())
        return f"{self.name or self.where} ({self.keras_class}: {shapes})"


class KerasReader(Reader):
    """Keras MobileNetV2 weights (.h5, .weights.h5, .keras, sharded .weights.json), raw values."""

    def __init__(self, path: Path, archive: Path | None = None, *, backbone_only: bool = False) -> None:
        """`backbone_only` drops whatever head the file has (several layers included) and keeps the
        104 backbone layers."""
        super().__init__(Path(path), archive)
        self._files: list[Any] = []  # open h5py files
        self._sources = [self.path]
        self._notes: list[str] = []
        try:
            try:
                config = self._open()
                layers = self._stored_layers(config)
                backbone, head = assign_layers(layers)
                self._config = ConfigFacts(config, len(BACKBONE))
                head, self._activations, notes = checked_head(self.path.name, head, self._config, backbone_only)
                self._notes += notes
                self._tensors = slim_tensors(backbone, head)
                self._hints = self._make_hints(head)
            except HDF5_ERRORS as exc:
                raise KerasFileError(
                    f"{self.path.name} is damaged: its HDF5 structure cannot be read ({first_line(exc)})"
                ) from None
        except BaseException:
            self.close()
            raise

    # --- Reader interface -------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name)[1]

    def read(self, name: str) -> np.ndarray:
        dataset, shape = self._tensor(name)
        try:
            values = np.asarray(dataset[()])
        except HDF5_ERRORS as exc:
            raise KerasFileError(f"{self.path.name}: cannot read {dataset.name} ({first_line(exc)})") from None
        if values.size != int(np.prod(shape)):
            raise KerasFileError(f"{self.path.name}: {dataset.name} holds {values.size} values, not {shape}")
        return values.astype(np.float32).reshape(shape)

    def source_files(self) -> list[Path]:
        return list(self._sources)

    @property
    def references(self) -> References:
        return References(keras_file=self.path)

    @property
    def hints(self) -> Hints:
        return self._hints

    def close(self) -> None:
        for handle in self._files:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 (closing a damaged file must not mask the real error)
                pass
        self._files = []

    # --- opening --------------------------------------------------------------------------------

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KerasFileError(f"{self.path.name} has no tensor {name}") from None

    def _open(self) -> dict | None:
        """Open the HDF5 file(s); returns the model config where the file carries one."""
        name = self.path.name.lower()
        if name.endswith(SHARD_INDEX_SUFFIX):
            return self._open_shards()
        if name.endswith(".keras"):
            return self._open_archive()
        handle = self._h5(self.path)
        if "model_config" not in handle.attrs:
            return None
        return parse_json(
            text_attribute(handle.attrs, "model_config", self.path.name), f"{self.path.name}: model_config"
        )

    def _h5(self, source, label: str | None = None):
        import h5py

        label = label or self.path.name
        try:
            handle = h5py.File(source, "r")
        except (OSError, ValueError) as exc:
            raise KerasFileError(
                f"{label} is not a readable HDF5 file ({first_line(exc)}); is it truncated or damaged?"
            ) from None
        self._files.append(handle)
        _, length_size = handle.id.get_create_plist().get_sizes()
        if isinstance(source, io.BytesIO):
            check_global_heaps(source.getvalue(), length_size, label)
        else:
            with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as contents:
                check_global_heaps(contents, length_size, label)
        return handle

    def _open_archive(self) -> dict:
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = {info.filename: info for info in archive.infolist()}
                missing = [m for m in KERAS_ARCHIVE_MEMBERS if m not in members]
                if missing:
                    raise KerasFileError(
                        f"{self.path.name} is not a Keras 3 model archive: it lacks {', '.join(missing)}"
                    )
                config = read_member(archive, members["config.json"], MAX_CONFIG_BYTES, self.path.name)
                weights = read_member(archive, members["model.weights.h5"], MAX_ARCHIVE_MEMBER_BYTES, self.path.name)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise KerasFileError(f"{self.path.name} is not a readable .keras archive ({first_line(exc)})") from None
        config = parse_json(config, f"{self.path.name}: config.json")
        self._buffer = io.BytesIO(weights)  # h5py reads it lazily: keep it alive with the reader
        self._h5(self._buffer, f"{self.path.name}: model.weights.h5")
        return config

    def _open_shards(self) -> None:
        index = parse_json(read_limited(self.path, MAX_CONFIG_BYTES), self.path.name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise KerasFileError(f"{self.path.name} is not a Keras shard index: it has no weight_map")
        shard_names: list[str] = []
        for files in weight_map.values():
            for shard in [files] if isinstance(files, str) else files if isinstance(files, list) else [None]:
                if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                    raise KerasFileError(
                        f"{self.path.name} names shard {shard!r}: shards must be plain file names next to the index"
                    )
                if shard not in shard_names:
                    shard_names.append(shard)
        for shard in shard_names:
            path = self.path.parent / shard
            if not path.is_file():
                raise KerasFileError(f"{self.path.name} needs shard {shard}, which is not next to it")
            self._sources.append(path)
            self._h5(path, shard)
        return None

    # --- layers as stored -------------------------------------------------------------------------

    def _stored_layers(self, config: dict | None) -> list[Layer]:
        roots = self._files
        legacy = [_legacy_root(root) for root in roots]
        if len(roots) == 1 and legacy[0] is not None:
            return _legacy_layers(legacy[0], self.path.name)
        if not all(is_group(root.get("layers", getlink=True)) for root in roots):
            raise KerasFileError(
                f"{self.path.name} holds no Keras weights: neither a layer_names attribute (legacy .h5) nor a "
                "layers/ group (Keras 3 .weights.h5)"
            )
        if any(_has_optimizer(root) for root in roots):
            self._notes.append("The file's optimizer state was ignored.")
        return _keras3_layers(_Merged(roots, ""), config)

    # --- heads and hints --------------------------------------------------------------------------

    def _make_hints(self, head: list[Layer]) -> Hints:
        facts = self._config
        notes = ["Keras stores plain (raw, non-EMA) values; Keras MobileNetV2 expects inputs x / 127.5 - 1."]
        notes += facts.notes + self._notes
        if any("bias" not in layer.weights for layer in head):
            notes.append("The head's Dense layers without a bias were given a zero bias (the same function).")
        size = facts.image_size
        if size is None and (match := MODEL_NAME.search(facts.model_name or "")):
            size = int(match["rows"])
        if size is None and (match := ZOO_FILE.search(self.path.name)):
            size = int(match["rows"])
        labels, preprocessing = None, facts.preprocessing
        if head:
            count = int(head[-1].weights["kernel"].shape[1])
            from_file, label_notes, preprocessing = teachable_machine_labels(
                self.path, count, size or DEFAULT_SIZE, preprocessing
            )
            notes += label_notes
            labels = from_file or class_labels(count, facts.class_names)
        return Hints(
            image_size=size,
            labels=labels,
            convention="raw",
            preprocessing=preprocessing,
            hidden_activations=self._activations[:-1],
            strided_padding=facts.strided_padding,
            notes=tuple(notes),
        )


# ---------------------------------------------------------------------------------------------------
# HDF5 access with every link and dataset checked
# ---------------------------------------------------------------------------------------------------


def _legacy_root(root):
    """The group whose layer_names attribute lists the layers (root or model_weights/), or None."""
    if "layer_names" in root.attrs or "layer_names0" in root.attrs:
        return root
    if is_group(root.get("model_weights", getlink=True)):
        group = root["model_weights"]
        if "layer_names" in group.attrs or "layer_names0" in group.attrs:
            return group
    return None


def _has_optimizer(root) -> bool:
    return "optimizer" in root or "optimizer_weights" in root


def _legacy_layers(group, where: str) -> list[Layer]:
    """Weighted layers in layer_names order; a nested model's group is split by weight-name prefix."""
    layers = []
    for layer_name in string_list(group.attrs, "layer_names", where) or []:
        layer_group = checked_child(group, layer_name, where)
        weight_names = string_list(layer_group.attrs, "weight_names", where)
        if weight_names is None:  # Keras writes it for every layer, empty for one without weights
            raise KerasFileError(f"{where}: layer {layer_name} has no weight_names attribute; the file is damaged")
        by_prefix: dict[str, dict[str, Any]] = {}
        for weight_name in weight_names:
            prefix, _, role = weight_name.removesuffix(":0").rpartition("/")
            role = "kernel" if role == "depthwise_kernel" else role
            by_prefix.setdefault(prefix or layer_name, {})[role] = checked_dataset(layer_group, weight_name, where)
        for prefix, weights in by_prefix.items():
            name = prefix.rpartition("/")[2]
            layers.append(Layer(name, class_from_weights(weights), f"{layer_group.name}/{prefix}", weights))
    return layers


def class_from_weights(weights: dict[str, Any]) -> str:
    roles = set(weights)
    if roles == set(ROLES[BATCHNORM]):
        return BATCHNORM
    kernel = weights.get("kernel")
    if kernel is not None and roles <= {"kernel", "bias"}:
        if len(kernel.shape) == 2:
            return DENSE
        if len(kernel.shape) == 4:
            return DEPTHWISE if kernel.shape[3] == 1 and kernel.shape[:2] == (3, 3) else CONV
    return "+".join(sorted(roles)) or "empty"


class _Merged:
    """One group path across several HDF5 files (a sharded save splits a model's groups between them)."""

    def __init__(self, groups: list, path: str) -> None:
        self.groups, self.path = groups, path

    def keys(self) -> list[str]:
        names: list[str] = []
        for group in self.groups:
            names += [k for k in group.keys() if k not in names]
        return names

    def child(self, name: str) -> _Merged | None:
        found = [checked_child(g, name, self.path or "/") for g in self.groups if name in g]
        return _Merged(found, f"{self.path}/{name}") if found else None

    def attr(self, name: str) -> str | None:
        for group in self.groups:
            if name in group.attrs:
                value = text_attribute(group.attrs, name, self.path)
                return value.decode("utf8", errors="replace") if isinstance(value, bytes) else str(value)
        return None


def _split_key(key: str) -> tuple[str, int]:
    """'batch_normalization_12' -> ('batch_normalization', 12); 'dense' -> ('dense', 0)."""
    stem, _, counter = key.rpartition("_")
    return (stem, int(counter)) if stem and counter.isdigit() else (key, 0)


def _keras3_layers(container: _Merged, config: dict | None = None) -> list[Layer]:
    """Weighted layers of a Keras 3 container, class by class in counter order, nested models inlined."""
    layers_group = container.child("layers")
    if layers_group is None:
        return []
    names = _config_group_names(config)
    found: list[tuple[tuple[str, int], Layer | list[Layer]]] = []
    for key in layers_group.keys():
        group = layers_group.child(key)
        where = f"{container.path}/layers/{key}"
        if group is None:  # listed, yet not found by name: the group's index of names is damaged
            raise KerasFileError(f"{where} is listed but cannot be opened by its name; the file is damaged")
        if group.child("layers") is not None:
            found.append((_split_key(key), _keras3_layers(group, names.get(key, (None, None))[1])))
            continue
        variables = group.child("vars")
        indices = sorted(int(k) for k in variables.keys() if k.isdigit()) if variables else []
        if not indices:
            continue
        stem, _ = _split_key(key)
        roles = ROLES.get(stem)
        if roles is None or len(indices) > len(roles) or indices != list(range(len(indices))):
            raise KerasFileError(
                f"{where}: a weighted layer of class {stem} with {len(indices)} variables has no place in MobileNetV2"
            )
        weights = {
            roles[i]: checked_dataset(g, f"vars/{i}", where)
            for i in indices
            for g in group.groups
            if "vars" in g and str(i) in g["vars"]
        }
        name = variables.attr("name") or names.get(key, (None, None))[0]
        found.append((_split_key(key), Layer(name, stem, where, weights)))
    # Nested containers first ordered among themselves, layers by class and counter.
    layers: list[Layer] = []
    for _, item in sorted(found, key=lambda pair: pair[0]):
        layers += item if isinstance(item, list) else [item]
    return layers


def _config_group_names(config: dict | None) -> dict[str, tuple[str | None, dict | None]]:
    """Group key -> (layer name, nested model config), by Keras' class + counter rule over the config."""
    if not isinstance(config, dict):
        return {}
    entries = (config.get("config") or {}).get("layers")
    if not isinstance(entries, list):
        return {}
    counters: dict[str, int] = {}
    names = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str):
            continue
        stem = _snake_case(entry["class_name"])
        count = counters.get(stem, -1) + 1
        counters[stem] = count
        key = stem if count == 0 else f"{stem}_{count}"
        inner = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        names[key] = (inner.get("name") or entry.get("name"), entry if "layers" in inner else None)
    return names


def _snake_case(name: str) -> str:
    """Keras' own rule for group names: 'DepthwiseConv2D' -> 'depthwise_conv2d'."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# ---------------------------------------------------------------------------------------------------
# Matching stored layers to the backbone
# ---------------------------------------------------------------------------------------------------


def checked_head(
    source: str, head: list[Layer], facts: ConfigFacts, backbone_only: bool
) -> tuple[list[Layer], tuple[str, ...], list[str]]:
    """The head's Dense layers in order (none for a backbone), checked against the model config (`facts`; a
    weights-only source has none), with the activation of each and notes; `source` names the file."""
    if backbone_only:
        if head:
            dropped = ", ".join(layer.name or layer.where for layer in head)
            return [], (), [f"Backbone only: the head ({dropped}) was dropped."]
        return [], (), []
    if not head:
        if facts.head_layers:
            raise KerasFileError(
                f"{source}: its model config has {', '.join(map(str, facts.head_layers))} after the "
                "backbone, but the weights hold no such layer; the file is damaged"
            )
        return [], (), []
    offer = "; convert the backbone alone instead (backbone_only, the --backbone-only option)"
    described = "; ".join(layer.describe() for layer in head)
    if any(layer.keras_class != DENSE for layer in head) or len(head) > MAX_HEAD_LAYERS:
        raise KerasHeadError(
            f"{source}: the head after the MobileNetV2 backbone has {len(head)} weighted layers "
            f"({described}); only a stack of up to {MAX_HEAD_LAYERS} Dense layers maps onto "
            f"MobileNetV2ForImageClassification{offer}"
        )
    if facts.head_problem:
        raise KerasHeadError(f"{source}: {facts.head_problem}{offer}")
    if facts.dense_layers is None:
        if len(head) > 1:
            raise KerasHeadError(
                f"{source} holds weights only, with {len(head)} Dense layers after the backbone "
                f"({described}): without the model config their activations are unknown; convert a file "
                f"saved with its architecture (model.save('model.keras') or model.save('model.h5')){offer}"
            )
        return head, ("linear",), []
    configured = facts.dense_layers
    if len(configured) != len(head) or any(
        use_bias != ("bias" in layer.weights) for (_, use_bias), layer in zip(configured, head, strict=False)
    ):
        raise KerasFileError(
            f"{source}: its model config has {len(configured)} Dense layers after the backbone "
            f"(use_bias {[b for _, b in configured]}), but the weights hold {described}; the file is damaged"
        )
    return head, tuple(activation for activation, _ in configured), []


def assign_layers(layers: list[Layer]) -> tuple[list[Layer], list[Layer]]:
    """Fill the backbone slots with the stored layers of each class in order; the rest is the head."""
    queues: dict[str, list[Layer]] = {}
    for layer in layers:
        queues.setdefault(layer.keras_class, []).append(layer)
    backbone = []
    for i, slot in enumerate(BACKBONE):
        queue = queues.get(slot.keras_class) or []
        if not queue:
            have = sum(1 for layer in backbone if layer.keras_class == slot.keras_class)
            raise KerasFileError(
                f"the file has only {have} {slot.keras_class} layers; MobileNetV2 needs "
                f"{sum(s.keras_class == slot.keras_class for s in BACKBONE)} (missing from {slot.names[0]} on): "
                "it is not a whole MobileNetV2"
            )
        layer = queue.pop(0)
        known = KNOWN_NAMES.get(layer.name or "")
        if known is not None and known != i:
            raise KerasFileError(
                f"layer {layer.name} is stored where {slot.names[0]} belongs: the file's layers are out of order"
            )
        backbone.append(layer)
    head = [layer for layer in layers if any(layer is queued for queue in queues.values() for queued in queue)]
    _check_chain(backbone)
    return backbone, head


def _check_chain(backbone: list[Layer]) -> None:
    """Kernel sizes and channel counts link up as in MobileNetV2."""
    channels = 3
    for slot, layer in zip(BACKBONE, backbone, strict=True):
        label = f"{layer.name or layer.where} (MobileNetV2 {slot.names[0]})"
        if slot.keras_class == BATCHNORM:
            shapes = {role: tuple(ds.shape) for role, ds in layer.weights.items()}
            if set(shapes) != set(ROLES[BATCHNORM]) or set(shapes.values()) != {(channels,)}:
                raise KerasFileError(f"{label} should hold 4 BatchNorm vectors of {channels}, not {shapes}")
            continue
        kernel = layer.weights.get("kernel")
        if kernel is None or set(layer.weights) != {"kernel"}:
            raise KerasFileError(f"{label} should hold one kernel and no bias, not {sorted(layer.weights)}")
        shape = tuple(kernel.shape)
        size = 3 if slot.keras_class == DEPTHWISE or slot.scope == "MobilenetV2/Conv" else 1
        out = 1 if slot.keras_class == DEPTHWISE else (shape[3] if len(shape) == 4 else 0)
        if len(shape) != 4 or shape[:3] != (size, size, channels) or out != shape[3] or out < 1:
            wanted = f"[{size}, {size}, {channels}, {'1' if out == 1 else 'out'}]"
            raise KerasFileError(f"{label} has kernel shape {list(shape)}, but MobileNetV2 needs {wanted} there")
        channels = channels if slot.keras_class == DEPTHWISE else shape[3]


def slim_tensors(backbone: list[Layer], head: list[Layer]) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """slim name -> (dataset, slim shape); the head's last Dense is the classifier, those before it hidden
    layers (`converter.slim.HIDDEN_HEADS`), each Dense kernel a 1x1 conv as in slim's head."""
    tensors = {}
    for slot, layer in zip(BACKBONE, backbone, strict=True):
        if slot.keras_class == BATCHNORM:
            for role, dataset in layer.weights.items():
                tensors[f"{slot.scope.removesuffix('/BatchNorm')}/{BN_SUFFIXES[role]}"] = (dataset, dataset.shape)
        else:
            variable = "depthwise_weights" if slot.keras_class == DEPTHWISE else "weights"
            tensors[f"{slot.scope}/{variable}"] = (layer.weights["kernel"], tuple(layer.weights["kernel"].shape))
    features = tensors["MobilenetV2/Conv_1/weights"][1][3]
    for j, layer in enumerate(head):
        kernel, bias = layer.weights["kernel"], layer.weights.get("bias")
        if (
            len(kernel.shape) != 2
            or kernel.shape[0] != features
            or (bias is not None and bias.shape != kernel.shape[1:])
        ):
            raise KerasHeadError(
                f"the head's Dense layer {layer.describe()} does not take the {features} features before it "
                "(a kernel [features, units] and a bias [units] are needed); convert the backbone alone instead "
                "(backbone_only, the --backbone-only option)"
            )
        last = j == len(head) - 1
        weights, biases = (
            (HEAD_WEIGHTS, HEAD_BIASES) if last else (HIDDEN_WEIGHTS.format(j=j), HIDDEN_BIASES.format(j=j))
        )
        tensors[weights] = (kernel, (1, 1, *kernel.shape))
        tensors[biases] = (
            bias if bias is not None else np.zeros(kernel.shape[1:], np.float32),
            tuple(kernel.shape[1:]),
        )
        features = kernel.shape[1]
    return tensors


# ---------------------------------------------------------------------------------------------------
# What the model config says beyond the weights
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------
