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


def wrap_or_close(resource, make):
    """``make(resource)`` (an adapter around an open reader); if building it raises, the reader is
    closed before the error propagates, so a failed open leaks no file handles."""
    try:
        return make(resource)
    except BaseException:
        resource.close()
        raise
