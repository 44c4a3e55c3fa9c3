"""Seeded, stable subsets of a dataset's images (`data.fraction`)."""

import hashlib
import math
from collections.abc import Sequence

from stages.errors import UserError


def _rank_key(seed: int, image_id: int) -> str:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def fraction_indices(image_ids: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices into `image_ids` of a `fraction` of the images.

    Images are ranked by sha256(f"{seed}:{image_id}") and the first ceil(fraction * N) (at least one) are
    kept. The choice depends only on the ids and the seed, so it is identical across runs, machines and
    input orderings, and nested: for one seed a smaller fraction is a subset of a larger one.
    An empty `image_ids` gives an empty list.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise UserError(f"data.fraction: got {fraction!r}; expected a number in (0, 1]")
    if len(image_ids) == 0:
        return []
    # Rounding first keeps float noise (0.3 * 10 = 3.0000000000000004) from adding an image.
    count = max(1, math.ceil(round(fraction * len(image_ids), 9)))
    ranked = sorted(range(len(image_ids)), key=lambda i: (_rank_key(seed, image_ids[i]), image_ids[i]))
    return sorted(ranked[:count])
