"""The planning rules (shape merging, kinds, tiling, right-sized tiles), written out again
independently of the package, for the layout and blocking tests to check it against."""

import fractions
import math

from wkron_eqx._layout import LeafKind


def expected_merge(shape: tuple[int, ...]) -> tuple[int, ...]:
    size = math.prod(shape)
    if len(shape) < 2:
        return (size,)
    if size == max(shape):
        return (max(shape),)
    if len(shape) == 2:
        return tuple(shape)
    splits = [(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]

    def ratio(split):
        small, large = min(split), max(split)
        return fractions.Fraction(large, small) if small else math.inf

    return min(splits, key=ratio)  # `min` keeps the first of equally good splits


def expected_kind(
    merged: tuple[int, ...], max_size_dense: int, memory_save_mode: str | None = None
) -> tuple[LeafKind, bool, bool]:
    """(kind, diag_left, diag_right) of a merged shape (ONE_D reports no diagonal sides).

    A side longer than `max_size_dense` is diagonal. Of a non-empty matrix,
    `"one_diag"` also makes the longer side diagonal (the right one when square),
    `"all_diag"` both; a matrix with a diagonal side is LARGE."""
    if len(merged) == 1:
        return LeafKind.ONE_D, False, False
    rows, cols = merged
    left, right = rows > max_size_dense, cols > max_size_dense
    if rows and cols and memory_save_mode == "one_diag":
        left, right = left or rows > cols, right or cols >= rows
    if rows and cols and memory_save_mode == "all_diag":
        left = right = True
    if not (left or right):
        return LeafKind.DENSE, False, False
    return LeafKind.LARGE, left, right


def expected_sides(length: int, block_size: int) -> list[int]:
    """The valid side of every tile along an axis of `length`."""
    return [min(block_size, length - start) for start in range(0, length, block_size)]


def expected_stored(valid: int, block_size: int) -> int:
    """Right-sized stored side: the valid side rounded up to a multiple of 8, at most bs."""
    return min(block_size, 8 * math.ceil(valid / 8))


def smallest_multiple_at_least(count: int, k: int) -> int:
    return next(s for s in range(count, count + k) if s % k == 0)


def parts_sides(parts) -> list[int]:
    return [p.size for p in parts for _ in range(p.count)]


def assert_parts_contiguous(parts, length: int):
    start = 0
    for part in parts:
        assert part.start == start and part.count >= 1 and part.size >= 1
        start += part.count * part.size
    assert start == length
