"""The cluster view's error family: each says what was refused and why."""

from __future__ import annotations


class ViewError(Exception):
    """Base class of every error raised by `lattica_ray.view`."""


class MalformedMessage(ViewError, ValueError):
    """A view message or envelope could not be decoded; it is refused whole."""


class MalformedUpdate(MalformedMessage):
    """The Yjs update inside an envelope is truncated, padded or inconsistent."""


class InvalidEnvelope(ViewError, ValueError):
    """An envelope's signature, author or size is wrong: it was forged or corrupted."""


class WriteRuleViolation(ViewError):
    """An update touches what its author may not write (another member's entry or actors, another
    author's items, a nested or foreign type). Signed, but refused."""


class MissingDependency(ViewError):
    """An update builds on items this replica does not have yet; it is held and the gap fetched."""


class InvalidValue(ViewError, ValueError):
    """A value given to the view cannot be stored (not JSON-serialisable, too large, bad name)."""


class SubscriptionOverflow(ViewError):
    """A subscriber fell behind by more changes than its queue holds; re-read the view."""


class ViewNotStarted(ViewError):
    """The view is used before `start()` or after `stop()`."""
