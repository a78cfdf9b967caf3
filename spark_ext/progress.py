"""One progress bar for every long loop of the package (calibration, the demo, the studies)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Optional


class _Counter:
    """Stands in for tqdm when it is not installed: a ``desc: n`` counter on stderr (nothing when disabled)."""

    def __init__(self, iterable: Optional[Iterable], desc: str, enabled: bool) -> None:
        self.iterable, self.desc, self.enabled, self.count = iterable, desc, enabled, 0

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.enabled:
            print(f"\r{self.desc}: {self.count}", end="", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        if self.enabled and self.count:
            print(file=sys.stderr)
            self.count = 0


def progress(iterable: Optional[Iterable] = None, desc: str = "", *, total: Optional[int] = None, quiet: bool = False):
    """A progress bar over ``iterable`` (or, with ``iterable=None``, one driven by ``update()``) on stderr.

    tqdm (the ``demo`` extra) when installed, else a plain counter; ``quiet`` shows nothing. The result
    iterates like ``iterable`` and has ``update(n)``, ``set_postfix_str(text)`` and ``close()``.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(iterable, desc, not quiet)
    kwargs: dict[str, Any] = {"desc": desc, "total": total, "leave": False, "dynamic_ncols": True}
    return tqdm(iterable, file=sys.stderr, disable=quiet, **kwargs)
