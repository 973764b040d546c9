"""A Keras file's reference: Keras' own model, loaded from the file or built by
``keras.applications.MobileNetV2`` with the inferred alpha, after :func:`check_keras_config`; endpoints
by Keras layer name."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converter.errors import VerificationError
from converter.formats.base import References
from converter.verify.references.base import (
    GLOBAL_POOL_TENSOR,
    INSTALL_HINT,
    KERAS,
    Backend,
    BaseReference,
    InputScaling,
    ReferenceInfo,
    ReferenceRequest,
)

#: The layer classes of keras.applications.MobileNetV2 and of the usual fine-tuning recipe. A model file's
#: config naming any other (Lambda and custom layers above all, which run code of the file's) is refused.
KERAS_LAYER_CLASSES = frozenset(
    {
        "Functional", "Model", "Sequential", "InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization",
        "ReLU", "ZeroPadding2D", "Add", "GlobalAveragePooling2D", "Dense", "Dropout", "Rescaling", "Activation",
        # augmentation of the fine-tuning recipe: the identity at inference
        "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness",
    }
)  # fmt: skip
#: The packages a model config may take its layers from: Keras 3's and tf.keras 2.x's (tf_keras).
KERAS_MODULES = ("keras", "tf_keras")
#: Slim endpoint -> the Keras layer (of keras.applications.MobileNetV2) whose output it is.
KERAS_ENDPOINT_LAYERS = {"layer_1": "Conv1_relu", "layer_2": "expanded_conv_project_BN", "layer_19": "out_relu"}


class KerasReference(BaseReference):
    """Keras' own model, built from the file, run on NHWC float images at its fixed input size."""

    def __init__(self, model, outputs: dict[str, int], info, missing, fixed_shape, scaling: InputScaling) -> None:
        self._model, self._outputs, self.info, self.missing = model, outputs, info, missing
        self._fixed, self._scaling = fixed_shape, scaling

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        return self._fixed

    def _run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            results = self._model([self._scaling.feed(images)], training=False)
        except (ValueError, TypeError) as error:
            shape = "x".join(map(str, images.shape))
            raise VerificationError(f"Keras' model failed on a {shape} input ({error})") from None
        results = results if isinstance(results, (list, tuple)) else [results]
        out = {}
        for name in names:
            value = np.asarray(results[self._outputs[name]])
            out[name] = value.reshape(len(images), 1, 1, -1) if name == GLOBAL_POOL_TENSOR else value
        return out


def keras_model_config(path: Path) -> dict | None:
    """The model config a Keras file carries (a .keras archive's config.json, a full-model .h5's
    model_config attribute), None for weights-only files."""
    import json
    import zipfile

    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as handle:
                text = handle.attrs.get("model_config")
                if text is None:
                    return None
                return json.loads(text.decode() if isinstance(text, bytes) else text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise VerificationError(f"{path.name}: its model config is not readable ({error})") from None
    return None


def check_keras_config(config: dict, origin: str) -> None:
    """Refuse a Keras model config with a layer outside `KERAS_LAYER_CLASSES` (at any depth of nesting),
    or one that Keras would take from another module than its own or from a registered custom object."""
    stack = [config]
    while stack:
        layer = stack.pop()
        name, module = layer.get("class_name"), layer.get("module")
        custom = layer.get("registered_name") not in (None, name)
        if name not in KERAS_LAYER_CLASSES or custom or (module and not str(module).startswith(KERAS_MODULES)):
            raise VerificationError(
                f"refusing {origin}: its model holds a {name} layer ({module or 'no module'}); only the layers "
                "of keras.applications.MobileNetV2 and a Dense head may be loaded, as others can run the file's code"
            )
        stack += list((layer.get("config") or {}).get("layers") or [])


def open_keras(tf, source: References, request: ReferenceRequest) -> KerasReference:
    import importlib
    import os

    path, depth, size = source["keras_file"], request.depth, request.image_size

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converter.formats import open_reader
    from converter.pipeline.table import endpoints_for

    config = keras_model_config(path)
    library = _keras_library(path, config)
    try:
        keras = importlib.import_module(library)
    except ImportError as error:
        raise VerificationError(f"verifying against {path.name} needs {library} ({error}); {INSTALL_HINT}") from None
    notes, model = [], None
    if config is not None:
        check_keras_config(config, path.name)
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
            notes.append(f"the reference is Keras' own model loaded from {path.name} ({library}.saving.load_model)")
        except Exception as error:  # noqa: BLE001 (Keras raises many kinds; each means it cannot rebuild it)
            if path.suffix != ".h5":
                raise VerificationError(f"Keras cannot load {path.name} ({_first_line(error)})") from None
            notes.append(f"Keras cannot rebuild the model from {path.name}'s config ({_first_line(error)})")
    if model is None:
        with open_reader(path) as reader:
            head = "MobilenetV2/Logits/Conv2d_1c_1x1/weights"
            classes = reader.shape(head)[-1] if head in reader.names() else None
        try:
            model = keras.applications.MobileNetV2(
                input_shape=(size, size, 3), alpha=depth, include_top=classes is not None, weights=None,
                classes=classes or 1000, classifier_activation=None,
            )  # fmt: skip
            model.load_weights(path)
        except Exception as error:  # noqa: BLE001 (as above)
            raise VerificationError(
                f"keras.applications.MobileNetV2(alpha={depth:g}) cannot load {path.name} ({_first_line(error)})"
            ) from None
        notes.append(
            f"the reference is keras.applications.MobileNetV2(alpha={depth:g}) at {size}x{size}, loading "
            f"{path.name} with Keras' own load_weights"
        )
    scaling = _input_scaling(model, notes)
    _, height, width, _ = model.inputs[0].shape
    fixed = (None, height or None, width or None)
    if not (height and width):  # its stride-2 padding is the converted model's (config strided_padding)
        notes.append("the Keras model takes any input size: it is compared at every size the inputs have")
    dense = _dense_layers(model)
    if dense and getattr(dense[-1], "activation", None) is not keras.activations.linear:
        dense[-1].activation = keras.activations.linear  # the logits, not the probabilities
        notes.append(f"the classifier's activation was set to linear to compare logits ({dense[-1].name})")
    # The logits are the model's output when its last layer ends in the classifier (itself, or a nested
    # head such as Teachable Machine's Sequential).
    logits = [model.layers[-1]] if dense and _ends_in(model.layers[-1], dense[-1]) else []
    layers = {layer.name: layer for layer in model.layers}
    pools = [layer for layer in model.layers if type(layer).__name__ == "GlobalAveragePooling2D"]
    wanted, missing = [], {}
    for endpoint, tensor, _ in endpoints_for(request.kind):
        if tensor not in request.tensors:
            continue
        layer = _keras_layer(endpoint, layers, pools, logits)
        if layer is None:
            missing[tensor] = (
                f"Keras' model has no top-level layer named as {endpoint}'s is in keras.applications.MobileNetV2 "
                "(a nested base runs as one layer)"
            )
        else:
            wanted.append((tensor, layer))
    outputs = {tensor: i for i, (tensor, _) in enumerate(wanted)}
    if len(wanted) > 1 or (wanted and wanted[0][1] is not model.layers[-1]):
        model = keras.Model(model.inputs, [layer.output for _, layer in wanted])
    info = ReferenceInfo(KERAS, path.name, "raw", "input", notes, input_range=scaling.input_range)
    return KerasReference(model, outputs, info, missing, fixed, scaling)


def _keras_library(path: Path, config: dict | None) -> str:
    """ "tf_keras" for a file Keras 2 (tf.keras) wrote, whose layer configs Keras 3 does not load (its
    modules, or a full-model .h5's keras_version 2.x, say so); "keras" otherwise."""
    if config is not None and '"tf_keras.' in json.dumps(config):
        return "tf_keras"
    if path.suffix == ".h5" and config is not None:
        import h5py

        with h5py.File(path, "r") as handle:
            version = handle.attrs.get("keras_version", b"")
        if str(version.decode() if isinstance(version, bytes) else version).startswith("2."):
            return "tf_keras"
    return "keras"


def _dense_layers(model) -> list:
    """The Dense layers of a (possibly nested) Keras model, in order."""
    found = []
    for layer in model.layers:
        found += _dense_layers(layer) if hasattr(layer, "layers") else [layer] * (type(layer).__name__ == "Dense")
    return found


def _ends_in(layer, dense) -> bool:
    """Whether `layer`'s output is `dense`'s: it is `dense`, or a nested model whose last layer ends in it."""
    return layer is dense or (hasattr(layer, "layers") and bool(layer.layers) and _ends_in(layer.layers[-1], dense))


def _input_scaling(model, notes: list[str]) -> InputScaling:
    """The Rescaling layer the model applies to its input (the fine-tuning recipe's x / 127.5 - 1);
    images in [-1, 1] are fed as (x - offset) / scale so that it gets them back."""
    rescaling = [layer for layer in model.layers if type(layer).__name__ == "Rescaling"]
    if not rescaling:
        return InputScaling()
    if len(rescaling) > 1 or np.size(rescaling[0].scale) != 1 or np.size(rescaling[0].offset) != 1:
        raise VerificationError("the Keras model rescales its input more than once or per channel")
    scaling = InputScaling(float(np.ravel(rescaling[0].scale)[0]), float(np.ravel(rescaling[0].offset)[0]))
    notes.append(f"the Keras model rescales its input ({scaling}): images were fed to it unscaled")
    return scaling


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _keras_layer(endpoint: str, layers: dict, pools: list, dense: list):
    if endpoint == "logits":
        return dense[-1] if dense else None
    if endpoint == "global_pool":
        return pools[0] if len(pools) == 1 else None
    if endpoint in KERAS_ENDPOINT_LAYERS:
        return layers.get(KERAS_ENDPOINT_LAYERS[endpoint])
    number, _, part = endpoint.removeprefix("layer_").partition("/")
    block = f"block_{int(number) - 2}"
    if part == "expansion_output":
        return layers.get(f"{block}_expand_relu")
    return layers.get(f"{block}_add") or layers.get(f"{block}_project_BN")


BACKENDS = (
    Backend(
        KERAS, "keras_file", open_keras, "the source is not a Keras file", "the Keras file, loaded and run by Keras"
    ),
)
