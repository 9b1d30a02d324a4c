"""Naive, independent implementations of the paper's formulas, used as references by the tests."""

import itertools

import torch
import torch.nn.functional as F


def paper_neighbor_pad(x, mask, k):
    """Algorithm 1 written literally: box filters as convolutions with a 3x3 ones kernel, epsilon 1e-8."""
    channels = x.shape[1]
    m = mask.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
    out = x * m
    ones = torch.ones(channels, 1, 3, 3, dtype=x.dtype)
    ones_mask = torch.ones(1, 1, 3, 3, dtype=x.dtype)
    for _ in range(k):
        n = F.conv2d(out, ones, padding=1, groups=channels)
        d = F.conv2d(m, ones_mask, padding=1)
        e = (1 - m) * n / (d + 1e-8)
        out = out + e
        m = torch.clamp(m + d, max=1)
    return out


def visible_any(mask, kernel, stride, padding, dilation):
    """Output mask of a convolution by loops: 1 where any tap of the window lands on a visible input cell."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, _, h, w = mask.shape
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(n, 1, out_h, out_w)
    for b, i, j in itertools.product(range(n), range(out_h), range(out_w)):
        for a, c in itertools.product(range(kh), range(kw)):
            y, x = i * sh - ph + a * dh, j * sw - pw + c * dw
            if 0 <= y < h and 0 <= x < w and mask[b, 0, y, x] > 0:
                out[b, 0, i, j] = 1
    return out


def windows(h, w, kernel, stride, padding):
    """(i, j, list of in-image cells) of every pooling window, floor mode."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h = (h + 2 * ph - kh) // sh + 1
    out_w = (w + 2 * pw - kw) // sw + 1
    for i, j in itertools.product(range(out_h), range(out_w)):
        cells = [
            (i * sh - ph + a, j * sw - pw + c)
            for a, c in itertools.product(range(kh), range(kw))
            if 0 <= i * sh - ph + a < h and 0 <= j * sw - pw + c < w
        ]
        yield i, j, cells
