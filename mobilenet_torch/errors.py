"""The errors mobilenet_torch raises itself (torch-free, so the converter can import them cheaply)."""


class ModelFolderError(Exception):
    """The folder is not a loadable model folder (missing files, or pickled weights we refuse)."""


class UnsupportedConfigError(ModelFolderError, ValueError):
    """A config field holds a value transformers honours but this model does not compute; also a
    ValueError, as every other invalid config value is."""
