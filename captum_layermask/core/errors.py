"""Exceptions raised for user mistakes; each message says what is wrong and how to fix it."""


class LayerMaskError(Exception):
    """Base class of every error raised by captum-layermask."""


class UnsupportedLayerError(LayerMaskError):
    """An operation of the model has no masking rule, or is used in a way its rule cannot mask."""


class MaskShapeError(LayerMaskError, ValueError):
    """A mask does not match the image it is applied to, or is not binary."""


class TracingError(LayerMaskError):
    """The model could not be traced into a graph by ``torch.fx``."""
