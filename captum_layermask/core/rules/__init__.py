r"""Built-in masking rules (paper section 3.2), one module per operation family.

Every rule keeps one invariant: values in removed cells are finite but unspecified, and an operation that
combines values of different cells reads only visible ones (through ``x * m``, the paper's
:math:`\mathbf{x} \odot \mathbf{m}`, which is exact for finite values; removed input pixels are cleared once, by
selection, when the image enters the graph). Operations that act on each cell separately therefore run
unchanged on the whole tensor, which is what makes layer masking cheap: only convolutions with kernels larger
than 1, pooling and reshapes that merge spatial dimensions do extra work.

- :mod:`.common`: the kit every rule is written with (binding arguments, checks, fills).
- :mod:`.pointwise`: per-cell operations and dropout; :mod:`.residual`: the union rule of residual sums.
- :mod:`.normalization`, :mod:`.linear`, :mod:`.attention`, :mod:`.convolution`, :mod:`.pooling`,
  :mod:`.reduction`, :mod:`.resampling`, :mod:`.shape`.

Importing this package registers every built-in rule (in this order; a target has one built-in rule).
"""

from .attention import einsum, matmul, multihead_attention, scaled_dot_product_attention, softmax
from .common import (
    as_mask,
    bind_arguments,
    fill_removed,
    in_batch_slices,
    layer_parameters,
    lowest_value,
    normalized_dims,
    require_feature_dims,
    require_masked,
    safe_divide,
    spatial_mask,
)
from .convolution import conv2d, conv2d_partial, conv2d_with_rings, conv2d_zero_padding, conv_transpose2d
from .linear import channel_conv1d, linear
from .normalization import batch_norm, group_norm, layer_norm, normalize
from .pointwise import dropout, pointwise
from .pooling import adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d
from .reduction import amax, amin, max_min, mean, norm, standard_deviation, sum_cells, variance
from .resampling import interpolate, pad
from .residual import SUM_TARGETS, sum_union
from .shape import (
    concatenate,
    expand,
    getitem,
    read_attribute,
    read_metadata,
    reorder,
    repeat,
    repeat_interleave,
    reshape,
    roll,
    split,
    unbind,
)

__all__ = [
    "SUM_TARGETS",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "amax",
    "amin",
    "as_mask",
    "avg_pool2d",
    "batch_norm",
    "bind_arguments",
    "channel_conv1d",
    "concatenate",
    "conv2d",
    "conv_transpose2d",
    "conv2d_partial",
    "conv2d_with_rings",
    "conv2d_zero_padding",
    "dropout",
    "einsum",
    "expand",
    "fill_removed",
    "getitem",
    "group_norm",
    "in_batch_slices",
    "interpolate",
    "layer_norm",
    "layer_parameters",
    "linear",
    "lowest_value",
    "matmul",
    "max_min",
    "max_pool2d",
    "mean",
    "multihead_attention",
    "norm",
    "normalize",
    "normalized_dims",
    "pad",
    "pointwise",
    "read_attribute",
    "read_metadata",
    "reorder",
    "repeat",
    "repeat_interleave",
    "require_feature_dims",
    "require_masked",
    "reshape",
    "roll",
    "safe_divide",
    "scaled_dot_product_attention",
    "softmax",
    "spatial_mask",
    "split",
    "standard_deviation",
    "sum_cells",
    "sum_union",
    "unbind",
    "variance",
]
