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
import json
import mmap
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import KerasFileError, KerasHeadError
from converter.formats.base import Hints, Reader, References
from converter.slim import HEADS, HIDDEN_HEADS, LAYER_PARAMS, NUM_BLOCKS, class_names
from converter.vocabulary import CLASSIFICATION

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
KERAS_ARCHIVE_MEMBERS = ("config.json", "model.weights.h5")
SHARD_INDEX_SUFFIX = ".weights.json"
# Generous limits: the largest MobileNetV2 tensor has ~2M values, the largest .keras file ~30 MB.
MAX_DIM = 1 << 17
MAX_ARCHIVE_MEMBER_BYTES = 1 << 30
MAX_CONFIG_BYTES = 64 << 20
MAX_NAMES = 100_000  # layer or weight names in one attribute
# A global heap collection (HDF5's store of variable-length data): its signature and version, and the
# smallest size the format allows.
GLOBAL_HEAP_SIGNATURE = b"GCOL\x01"
GLOBAL_HEAP_MIN_SIZE = 4096
# What h5py raises for damaged files (HDF5's errors, mapped onto Python's by kind).
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)

CONV, DEPTHWISE, BATCHNORM, DENSE = "conv2d", "depthwise_conv2d", "batch_normalization", "dense"
CLASS_NAMES = {"Conv2D": CONV, "DepthwiseConv2D": DEPTHWISE, "BatchNormalization": BATCHNORM, "Dense": DENSE}
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
MAX_HEAD_LAYERS = 8  # "a short stack": more Dense layers are not a MobileNetV2 classifier
# Activations of a head's Dense layers: the hidden ones may apply these, the last one only "linear" (logits)
# or "softmax" (noted: the converted model returns logits).
HIDDEN_ACTIVATIONS = ("relu", "linear")
# Teachable Machine's class names ("0 Class 1" lines), next to its keras_model.h5.
LABELS_FILE = "labels.txt"
LABEL_LINE = re.compile(r"^(?P<index>\d+) (?P<name>.*)$")
MAX_LABELS_BYTES = 1 << 20
DEFAULT_SIZE = 224  # what the converter assumes when nothing says the input size
ZOO_FILE = re.compile(r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_(?P<alpha>[\d.]+)_(?P<rows>\d+)")
MODEL_NAME = re.compile(r"mobilenetv2_(?P<alpha>\d+\.\d+)_(?P<rows>\d+)")
KERAS_INPUT = {
    "image_processor_type": "MobileNetV2ImageProcessor",
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
}
RELU_OPTIONS = ("max_value", "negative_slope", "threshold")  # a ReLU layer with any of these is not a plain ReLU
# Layers that do nothing at inference (data augmentation, dropout) or that the backbone's ReLU6 already is.
INERT_LAYERS = re.compile(r"^(Random\w+|Dropout|SpatialDropout2D|GaussianNoise|GaussianDropout|InputLayer)$")


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

    format = "keras"
    description = "Keras MobileNetV2 (.h5 / .weights.h5 / .keras / sharded .weights.json), h5py only"

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
                self._config = _ConfigFacts(config)
                self._activations: tuple[str, ...] = ()
                head = self._check_head(head, backbone_only)
                self._tensors = slim_tensors(backbone, head)
                self._hints = self._make_hints(head)
            except HDF5_ERRORS as exc:
                raise KerasFileError(
                    f"{self.path.name} is damaged: its HDF5 structure cannot be read ({_first_line(exc)})"
                ) from None
        except BaseException:
            self.close()
            raise

    # --- Reader interface -------------------------------------------------------------------------

    @classmethod
    def sniff(cls, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        name = path.name.lower()
        if name.endswith(SHARD_INDEX_SUFFIX):
            return True
        if name.endswith(".keras"):
            try:
                with zipfile.ZipFile(path) as archive:
                    return set(KERAS_ARCHIVE_MEMBERS) <= set(archive.namelist())
            except (OSError, zipfile.BadZipFile):
                return False
        if name.endswith((".h5", ".hdf5")):
            with open(path, "rb") as fh:
                return fh.read(len(HDF5_MAGIC)) == HDF5_MAGIC
        return False

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name)[1]

    def read(self, name: str) -> np.ndarray:
        dataset, shape = self._tensor(name)
        try:
            values = np.asarray(dataset[()])
        except HDF5_ERRORS as exc:
            raise KerasFileError(f"{self.path.name}: cannot read {dataset.name} ({_first_line(exc)})") from None
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
        return _parse_json(_attribute(handle.attrs, "model_config", self.path.name), f"{self.path.name}: model_config")

    def _h5(self, source, label: str | None = None):
        import h5py

        label = label or self.path.name
        try:
            handle = h5py.File(source, "r")
        except (OSError, ValueError) as exc:
            raise KerasFileError(
                f"{label} is not a readable HDF5 file ({_first_line(exc)}); is it truncated or damaged?"
            ) from None
        self._files.append(handle)
        _, length_size = handle.id.get_create_plist().get_sizes()
        if isinstance(source, io.BytesIO):
            _check_global_heaps(source.getvalue(), length_size, label)
        else:
            with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as contents:
                _check_global_heaps(contents, length_size, label)
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
                config = _read_member(archive, members["config.json"], MAX_CONFIG_BYTES, self.path.name)
                weights = _read_member(archive, members["model.weights.h5"], MAX_ARCHIVE_MEMBER_BYTES, self.path.name)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise KerasFileError(f"{self.path.name} is not a readable .keras archive ({_first_line(exc)})") from None
        config = _parse_json(config, f"{self.path.name}: config.json")
        self._buffer = io.BytesIO(weights)  # h5py reads it lazily: keep it alive with the reader
        self._h5(self._buffer, f"{self.path.name}: model.weights.h5")
        return config

    def _open_shards(self) -> None:
        index = _parse_json(_read_limited(self.path, MAX_CONFIG_BYTES), self.path.name)
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
        if not all(_is_group(root.get("layers", getlink=True)) for root in roots):
            raise KerasFileError(
                f"{self.path.name} holds no Keras weights: neither a layer_names attribute (legacy .h5) nor a "
                "layers/ group (Keras 3 .weights.h5)"
            )
        if any(_has_optimizer(root) for root in roots):
            self._notes.append("The file's optimizer state was ignored.")
        return _keras3_layers(_Merged(roots, ""), config)

    # --- heads and hints --------------------------------------------------------------------------

    def _check_head(self, head: list[Layer], backbone_only: bool) -> list[Layer]:
        """The head's Dense layers in order (none for a backbone), checked against the model config."""
        facts = self._config
        if backbone_only:
            if head:
                self._notes.append(
                    f"Backbone only: the head ({', '.join(layer.name or layer.where for layer in head)}) was dropped."
                )
            return []
        if not head:
            if facts.head_layers:
                raise KerasFileError(
                    f"{self.path.name}: its model config has {', '.join(map(str, facts.head_layers))} after the "
                    "backbone, but the weights hold no such layer; the file is damaged"
                )
            return []
        offer = "; convert the backbone alone instead (backbone_only, the --backbone-only option)"
        described = "; ".join(layer.describe() for layer in head)
        if any(layer.keras_class != DENSE for layer in head) or len(head) > MAX_HEAD_LAYERS:
            raise KerasHeadError(
                f"{self.path.name}: the head after the MobileNetV2 backbone has {len(head)} weighted layers "
                f"({described}); only a stack of up to {MAX_HEAD_LAYERS} Dense layers maps onto "
                f"MobileNetV2ForImageClassification{offer}"
            )
        if facts.head_problem:
            raise KerasHeadError(f"{self.path.name}: {facts.head_problem}{offer}")
        if facts.dense_layers is None:
            if len(head) > 1:
                raise KerasHeadError(
                    f"{self.path.name} holds weights only, with {len(head)} Dense layers after the backbone "
                    f"({described}): without the model config their activations are unknown; convert a file "
                    f"saved with its architecture (model.save('model.keras') or model.save('model.h5')){offer}"
                )
            self._activations = ("linear",)
            return head
        configured = facts.dense_layers
        if len(configured) != len(head) or any(
            use_bias != ("bias" in layer.weights) for (_, use_bias), layer in zip(configured, head, strict=False)
        ):
            raise KerasFileError(
                f"{self.path.name}: its model config has {len(configured)} Dense layers after the backbone "
                f"(use_bias {[b for _, b in configured]}), but the weights hold {described}; the file is damaged"
            )
        self._activations = tuple(activation for activation, _ in configured)
        return head

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
            from_file, problem = _labels_file(self.path, count)
            notes += [problem] if problem else []
            if from_file is not None:
                notes.append(
                    f"The class names were read from {LABELS_FILE} next to the model (Teachable Machine's export); "
                    "it takes the center square of an image resized to its input size, x / 127.5 - 1."
                )
                # Resizing the shorter side to the input size, then cropping the center: that square.
                preprocessing = {**(preprocessing or {}), "size": {"shortest_edge": size or DEFAULT_SIZE}}
            labels = from_file or _labels(count, facts.class_names)
        return Hints(
            image_size=size,
            labels=labels,
            convention="raw",
            preprocessing=preprocessing,
            hidden_activations=self._activations[:-1],
            notes=tuple(notes),
        )


# ---------------------------------------------------------------------------------------------------
# HDF5 access with every link and dataset checked
# ---------------------------------------------------------------------------------------------------


def _is_group(link) -> bool:
    import h5py

    return isinstance(link, h5py.HardLink)


def _child(group, name: str, where: str):
    """group[name], refusing soft and external links (which h5py would follow silently)."""
    import h5py

    link = group.get(name, getlink=True)
    if link is None:
        raise KerasFileError(f"{where}: {group.name.rstrip('/')}/{name} is missing")
    if not isinstance(link, h5py.HardLink):
        raise KerasFileError(
            f"{where}: {group.name.rstrip('/')}/{name} is a {type(link).__name__}, which is refused: "
            "a weights file must hold its data itself"
        )
    return group[name]


def _dataset(group, path: str, where: str):
    """A dataset reached through hard links only, stored in the file, of a float dtype."""
    import h5py

    node = group
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, h5py.Group):
            raise KerasFileError(f"{where}: {node.name} is not a group")
        node = _child(node, part, where)
    if not isinstance(node, h5py.Dataset):
        raise KerasFileError(f"{where}: {node.name} is not a dataset")
    if node.is_virtual or node.external:
        raise KerasFileError(f"{where}: {node.name} keeps its data in other files, which is refused")
    if node.dtype.kind != "f":
        raise KerasFileError(f"{where}: {node.name} has dtype {node.dtype}, not a float type; the file is not weights")
    if len(node.shape) > 4 or any(d > MAX_DIM for d in node.shape):
        raise KerasFileError(f"{where}: {node.name} claims shape {list(node.shape)}, far beyond any MobileNetV2")
    return node


def _check_global_heaps(contents, length_size: int, label: str) -> None:
    """Refuse a file whose global heap collections (where HDF5 keeps variable-length strings: the layer and
    weight names, the model config) do not hold together, before h5py reads any of them.

    libhdf5 walks a collection's objects by their declared sizes and, on a size that does not advance
    the walk, loops forever. A collection is found as libhdf5 recognises one (its signature and version);
    its objects must then tile it: every object header whole, every step forward, none past its end.
    Weights hardly ever spell the signature by chance: as float32 it needs a value near 199 or beyond 3e4."""
    header = len(GLOBAL_HEAP_SIGNATURE) + 3 + length_size  # signature and version, 3 reserved, collection size
    object_header = 8 + length_size  # index, reference count, 4 reserved, object size
    start = contents.find(GLOBAL_HEAP_SIGNATURE)
    while start >= 0:
        size = int.from_bytes(contents[start + header - length_size : start + header], "little")
        end = start + size
        problem = None
        if size < GLOBAL_HEAP_MIN_SIZE or end > len(contents):
            problem = f"it claims {size} bytes, not between {GLOBAL_HEAP_MIN_SIZE} and the end of the file"
        position = start + header
        while problem is None and position + object_header <= end:
            index = int.from_bytes(contents[position : position + 2], "little")
            declared = int.from_bytes(contents[position + 8 : position + object_header], "little")
            # The free-space object (index 0) counts its own header; the others are padded to 8 bytes.
            step = object_header + -(-declared // 8) * 8 if index else declared
            if step < object_header or position + step > end:
                problem = (
                    f"object {index} at byte {position} declares {declared} bytes, below its header or past the end"
                )
            position += step
        if problem:
            raise KerasFileError(
                f"{label} is damaged: the global heap collection at byte {start} (its variable-length strings) "
                f"is inconsistent: {problem}; the file cannot be read safely, re-save or re-download it"
            )
        start = contents.find(GLOBAL_HEAP_SIGNATURE, start + 1)


def _attribute(attrs, name: str, where: str):
    """One text attribute (every one the reader reads holds names or JSON), its size and type checked before
    it is read: a damaged header can claim billions of values, or turn a string into a variable-length
    sequence, which h5py crashes on. Keras stores an empty list as an empty float array."""
    import h5py

    attribute = attrs.get_id(name)
    shape = attribute.shape or ()
    if len(shape) > 1 or int(np.prod(shape)) > MAX_NAMES:
        raise KerasFileError(f"{where}: attribute {name} claims shape {list(shape)}; the file is damaged")
    if int(np.prod(shape)) and not isinstance(attribute.get_type(), h5py.h5t.TypeStringID):
        raise KerasFileError(f"{where}: attribute {name} holds {attribute.dtype} values, not text")
    return attrs[name]


def _strings(attrs, name: str, where: str) -> list[str] | None:
    """A list-of-names attribute, whole or split into name0, name1, ... (Keras' 64 KB header limit)."""
    if name in attrs:
        chunks = [_attribute(attrs, name, where)]
    elif f"{name}0" in attrs:
        chunks, i = [], 0
        while f"{name}{i}" in attrs and i < MAX_NAMES:
            chunks.append(_attribute(attrs, f"{name}{i}", where))
            i += 1
    else:
        return None
    values = []
    for chunk in chunks:
        for item in np.atleast_1d(np.asarray(chunk)).tolist():
            if isinstance(item, bytes):
                item = item.decode("utf8", errors="replace")
            if not isinstance(item, str):
                raise KerasFileError(f"{where}: attribute {name} holds {type(item).__name__} values, not names")
            values.append(item)
    return values


def _legacy_root(root):
    """The group whose layer_names attribute lists the layers (root or model_weights/), or None."""
    if "layer_names" in root.attrs or "layer_names0" in root.attrs:
        return root
    if _is_group(root.get("model_weights", getlink=True)):
        group = root["model_weights"]
        if "layer_names" in group.attrs or "layer_names0" in group.attrs:
            return group
    return None


def _has_optimizer(root) -> bool:
    return "optimizer" in root or "optimizer_weights" in root


def _legacy_layers(group, where: str) -> list[Layer]:
    """Weighted layers in layer_names order; a nested model's group is split by weight-name prefix."""
    layers = []
    for layer_name in _strings(group.attrs, "layer_names", where) or []:
        layer_group = _child(group, layer_name, where)
        weight_names = _strings(layer_group.attrs, "weight_names", where)
        if weight_names is None:  # Keras writes it for every layer, empty for one without weights
            raise KerasFileError(f"{where}: layer {layer_name} has no weight_names attribute; the file is damaged")
        by_prefix: dict[str, dict[str, Any]] = {}
        for weight_name in weight_names:
            prefix, _, role = weight_name.removesuffix(":0").rpartition("/")
            role = "kernel" if role == "depthwise_kernel" else role
            by_prefix.setdefault(prefix or layer_name, {})[role] = _dataset(layer_group, weight_name, where)
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
        found = [_child(g, name, self.path or "/") for g in self.groups if name in g]
        return _Merged(found, f"{self.path}/{name}") if found else None

    def attr(self, name: str) -> str | None:
        for group in self.groups:
            if name in group.attrs:
                value = _attribute(group.attrs, name, self.path)
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
            roles[i]: _dataset(g, f"vars/{i}", where)
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


def _labels_file(model: Path, count: int) -> tuple[tuple[str, ...] | None, str | None]:
    """The class names of Teachable Machine's labels.txt next to `model` ("0 Class 1" lines, one per class),
    and a note when there is one that does not name the head's classes (it is then not used)."""
    path = model.parent / LABELS_FILE
    if not path.is_file():
        return None, None
    with open(path, "rb") as fh:
        raw = fh.read(MAX_LABELS_BYTES + 1)
    lines = raw.decode("utf8", errors="replace").splitlines() if len(raw) <= MAX_LABELS_BYTES else []
    names = [LABEL_LINE.match(line.strip()) for line in lines if line.strip()]
    if len(names) != count or any(m is None or int(m["index"]) != i for i, m in enumerate(names)):
        return None, (
            f"{LABELS_FILE} next to the model was not used: it does not hold {count} lines '<index> <class name>' "
            "numbered from 0, one per class of the model."
        )
    return tuple(m["name"] for m in names), None


def _labels(count: int, configured: list[str] | None) -> tuple[str, ...]:
    if configured is not None and len(configured) == count:
        return tuple(configured)
    imagenet = class_names(CLASSIFICATION, 1001)
    if count == len(imagenet) - 1:
        return tuple(imagenet[1:])  # Keras' ImageNet head has no background class
    return tuple(class_names(CLASSIFICATION, count))


# ---------------------------------------------------------------------------------------------------
# What the model config says beyond the weights
# ---------------------------------------------------------------------------------------------------


class _ConfigFacts:
    """Input size, preprocessing layers, pooling and labels, read off a Keras model config."""

    def __init__(self, config: dict | None) -> None:
        self.notes: list[str] = []
        self.image_size: int | None = None
        self.preprocessing: dict[str, Any] | None = None  # None: [-1, 1], as the preprocessor config
        self.head_problem: str | None = None
        self.model_name: str | None = None
        self.class_names: list[str] | None = None
        self.head_layers: list[str] = []  # the weighted layers the config has after the backbone
        # (activation, use_bias) of each Dense layer after the backbone; None without a config to say.
        self.dense_layers: list[tuple[str, bool]] | None = None
        if not isinstance(config, dict):
            return
        leaves, containers = [], []
        _flatten(config, leaves, containers)
        self.model_name = next((n for n in containers if MODEL_NAME.search(n or "")), None)
        names = config.get("class_names") or (config.get("config") or {}).get("class_names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            self.class_names = names
        weighted = [i for i, (cls, _, _) in enumerate(leaves) if cls in CLASS_NAMES]
        if len(weighted) < len(BACKBONE):
            return
        first, last = weighted[0], weighted[len(BACKBONE) - 1]
        self.head_layers = [leaves[i][1] for i in weighted[len(BACKBONE) :]]
        self._inputs(leaves[:first])
        self._head(leaves[last + 1 :])

    def _inputs(self, before: list[tuple[str, str, dict]]) -> None:
        shapes = [c.get("batch_shape") or c.get("batch_input_shape") for _, _, c in before]
        shapes = [s for s in shapes if isinstance(s, list) and len(s) == 4]
        # A base built with input_shape=None fixes its paddings for any size, even when wrapped at a fixed one.
        if any(None in s[1:3] for s in shapes):
            self.notes.append(
                "The Keras backbone was built for inputs of any size (input_shape=None): Keras then pads stride-2 "
                "layers ((0, 1), (0, 1)) at every size, which differs from TF's SAME padding at odd sizes; the "
                "converted model uses SAME padding (exact for the original weights at every size)."
            )
        if shapes and None not in shapes[0][1:3]:
            rows, cols = shapes[0][1:3]
            if rows == cols:
                self.image_size = int(rows)
            else:
                self.notes.append(f"The Keras model's input is {rows}x{cols} (not square).")
        for cls, name, cfg in before:
            if cls == "Rescaling":
                self._rescaling(name, cfg)
            elif INERT_LAYERS.match(cls):
                self._left_out(cls, name)
            else:
                self.notes.append(f"The Keras model applies {cls} ({name}) ahead of the backbone; ours does not.")

    def _left_out(self, cls: str, name: str) -> None:
        """An inert layer (augmentation, dropout: the identity at inference) is noted where the model has it."""
        if cls != "InputLayer":
            self.notes.append(f"The Keras model's {cls} layer ({name}) is inactive at inference and was left out.")

    def _rescaling(self, name: str, cfg: dict) -> None:
        """Rescaling computes x * scale + offset: the same input the preprocessor must produce from pixels."""
        try:
            scale = np.broadcast_to(np.asarray(cfg.get("scale", 1.0), dtype=np.float64), (3,))
            offset = np.broadcast_to(np.asarray(cfg.get("offset", 0.0), dtype=np.float64), (3,))
        except (TypeError, ValueError):
            self.notes.append(f"The Keras model's Rescaling layer ({name}) has a scale the converter cannot read.")
            return
        if not np.all(scale > 0):
            self.notes.append(f"The Keras model's Rescaling layer ({name}) has a non-positive scale.")
            return
        # x * scale + offset == (x / 255 - mean) / std with std = 1 / (255 scale), mean = -offset * std.
        std = 1 / (255 * scale)
        mean = -offset * std
        if not np.allclose([mean, std], 0.5, rtol=1e-6):  # anything but x / 127.5 - 1
            self.preprocessing = dict(KERAS_INPUT, image_mean=mean.tolist(), image_std=std.tolist())
        self.notes.append(
            f"The Keras model rescales its inputs itself (Rescaling {name}: x * {cfg.get('scale')} + "
            f"{cfg.get('offset', 0.0)}); the converted model leaves that to its preprocessor config."
        )

    def _head(self, after: list[tuple[str, str, dict]]) -> None:
        """The pooling ahead of the Dense layers, and each Dense layer's (activation, use_bias), its
        activation taken from the layer or from a ReLU / Activation / Softmax layer right after it."""
        dense = [i for i, (cls, _, _) in enumerate(after) if cls == "Dense"]
        before_dense = after[: dense[0]] if dense else after
        classes = [cls for cls, _, _ in before_dense]
        if dense:
            if "GlobalMaxPooling2D" in classes:
                self.head_problem = "the classifier follows GlobalMaxPooling2D, but MobileNetV2 pools by average"
            elif "AveragePooling2D" in classes:
                self.notes.append(
                    "The Keras head pools with a fixed AveragePooling2D window (global only at its native size); "
                    "the converted model pools globally."
                )
            elif "GlobalAveragePooling2D" not in classes:
                self.head_problem = f"the classifier does not follow global average pooling ({', '.join(classes)})"
        layers: list[list] = []  # [activation, use_bias] per Dense
        for cls, name, cfg in after:
            if cls == "Dense":
                layers.append([_activation(cfg.get("activation")), cfg.get("use_bias", True) is not False])
            elif cls in ("ReLU", "Activation", "Softmax") and not layers:
                continue  # the backbone's final ReLU6 (out_relu)
            elif cls in ("ReLU", "Activation", "Softmax"):
                applied = _activation(cfg.get("activation")) if cls == "Activation" else cls.lower()
                if cls == "ReLU" and any(cfg.get(key) not in (None, 0, 0.0) for key in RELU_OPTIONS):
                    applied = f"ReLU({', '.join(f'{k}={cfg.get(k)}' for k in RELU_OPTIONS)})"
                if layers[-1][0] != "linear":
                    self.head_problem = f"{name} applies {applied} after {layers[-1][0]}, which MobileNetV2 does not"
                layers[-1][0] = applied
            elif INERT_LAYERS.match(cls):
                self._left_out(cls, name)
            elif cls not in ("GlobalAveragePooling2D", "AveragePooling2D", "Flatten", "GlobalMaxPooling2D"):
                self.notes.append(f"The Keras model applies {cls} ({name}) after the backbone; the converted does not.")
        for j, (activation, _) in enumerate(layers):
            if j == len(layers) - 1 and activation == "softmax":
                self.notes.append("The Keras model ends in a softmax; the converted model returns logits.")
            elif j == len(layers) - 1 and activation != "linear":
                self.head_problem = f"the classifier applies activation {activation!r} to its logits"
            elif j < len(layers) - 1 and activation not in HIDDEN_ACTIVATIONS:
                self.head_problem = (
                    f"the head's Dense layer {j + 1} applies activation {activation!r}; "
                    f"mobilenet_torch computes {' or '.join(HIDDEN_ACTIVATIONS)} there"
                )
        self.dense_layers = [(activation, use_bias) for activation, use_bias in layers]


def _activation(value: Any) -> str:
    """A Keras activation as named in a layer config ("linear" for none)."""
    return "linear" if value in (None, "linear") else value if isinstance(value, str) else repr(value)


def _flatten(entry: Any, leaves: list, containers: list) -> None:
    """Leaf layers of a (possibly nested) model config in order, and the container names."""
    if not isinstance(entry, dict):
        return
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    layers = cfg.get("layers")
    if isinstance(layers, list):
        containers.append(cfg.get("name"))
        for layer in layers:
            _flatten(layer, leaves, containers)
    elif isinstance(entry.get("class_name"), str):
        leaves.append((entry["class_name"], cfg.get("name") or entry.get("name"), cfg))


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def _parse_json(raw: Any, where: str) -> Any:
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw.item()
    try:
        return json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, RecursionError) as exc:
        raise KerasFileError(f"{where} is not valid JSON ({_first_line(exc)})") from None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    if info.file_size > limit:
        raise KerasFileError(f"{where}: {info.filename} claims {info.file_size} bytes, more than {limit}")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise KerasFileError(f"{where}: {info.filename} expands beyond {limit} bytes")
    return data


def _read_limited(path: Path, limit: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise KerasFileError(f"{path.name} is larger than {limit} bytes: not a Keras shard index")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
