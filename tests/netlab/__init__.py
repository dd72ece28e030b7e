"""NAT lab: Linux network namespaces that model the Internet, for NAT traversal tests.

Use the ``netlab`` pytest fixture (tests/netlab/plugin.py) or :class:`Lab` directly; run
``python -m tests.netlab --help`` for the command line.
"""

from tests.netlab.lab import Lab, NodeInfo, RouterDrops
from tests.netlab.netem import LinkCondition
from tests.netlab.netns import LabError, unavailable_reason
from tests.netlab.routers import BEHAVIOUR, Behaviour, Filtering, Mapping, NatKind
from tests.netlab.state import cleanup_stale

__all__ = [
    "BEHAVIOUR",
    "Behaviour",
    "Filtering",
    "Lab",
    "LabError",
    "LinkCondition",
    "Mapping",
    "NatKind",
    "NodeInfo",
    "RouterDrops",
    "cleanup_stale",
    "unavailable_reason",
]
