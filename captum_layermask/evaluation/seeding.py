"""One seed per image, so that an image's random choices (removal orders, Lime and KernelShap samples) do not depend
on which batch, worker or run computes it."""


def image_seed(seed: int, position: int) -> int:
    """The seed of the image at ``position`` of a set evaluated with ``seed``."""
    return seed * 1_000_003 + position
