"""How large a top-k answer is, shared by ``engine.searcher`` and ``engine.memory_bank``.

An answer is padded (row -1, score -inf) up to ``k`` columns, but never past ``max(n, PAD_COLUMNS)`` for ``n``
stored rows (``answer_columns``), so a huge ``k`` costs no more memory than the rows or a small fixed width.
Result arrays that still cannot be allocated raise ``ResultTooLarge`` (a MemoryError), which the callers turn
into an ``InputError`` naming ``k``.
"""

PAD_COLUMNS = 1024  # an answer is padded up to k columns, but not past max(n, PAD_COLUMNS)


def answer_columns(k: int, n: int) -> int:
    """How many columns a top-``k`` answer over ``n`` stored rows has: ``min(k, max(n, PAD_COLUMNS))``.

    Up to ``PAD_COLUMNS`` (and up to ``n``) that is ``k`` itself, padding included; beyond, the columns past
    the ``n`` rows would hold padding only, so they are left out and memory stays bounded by the rows."""
    return min(k, max(n, PAD_COLUMNS))


class ResultTooLarge(MemoryError):
    """The (nq, k) result arrays asked for cannot be allocated (``k`` far beyond the stored rows)."""
