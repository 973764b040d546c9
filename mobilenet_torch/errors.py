"""The one error mobilenet_torch raises itself (torch-free, so the converter can import it cheaply)."""


class ModelFolderError(Exception):
    """The folder is not a loadable model folder (missing files, or pickled weights we refuse)."""
