"""The context-manager protocol shared by readers and writers.

* ``ClosesOnExit``: ``with reader:`` closes the reader (its files) however the block ends.
* ``CommitsOnExit``: ``with writer:`` calls ``close()`` (finish and commit the output) when the
  block succeeds and ``abort()`` (drop what was written) when it raises.
"""
from __future__ import annotations


class ClosesOnExit:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CommitsOnExit:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
