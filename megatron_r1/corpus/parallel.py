"""An order-preserving process-pool map with a bounded number of batches in flight.

``multiprocessing.Pool.imap`` reads its whole input iterator ahead of the workers, which would pull
a tens-of-GB corpus into memory whenever the workers are slower than the reader; here at most
``max_in_flight`` batches are queued at any time.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Callable, Iterable, Iterator


def ordered_map(
    func: Callable,
    items: Iterable,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    max_in_flight: int | None = None,
) -> Iterator:
    """Yield ``func(item)`` for each item, in input order, computed by ``workers`` processes.

    ``workers <= 1`` runs everything in this process (after calling ``initializer`` here), which
    keeps results identical between the serial and the parallel path.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield func(item)
        return
    max_in_flight = max_in_flight or 4 * workers
    with multiprocessing.get_context().Pool(workers, initializer, initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) >= max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
