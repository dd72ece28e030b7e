"""Suite-wide test settings. Each area keeps its own fixtures in tests/<area>/conftest.py."""

import logging

# The NAT lab's `netlab` fixture and `root` marker handling (skips with a reason without root).
pytest_plugins = ["tests.netlab.plugin"]

logging.getLogger("aioquic").setLevel(logging.WARNING)
