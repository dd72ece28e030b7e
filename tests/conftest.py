"""Suite-wide test settings. Each area keeps its own fixtures in tests/<area>/conftest.py."""

import logging

logging.getLogger("aioquic").setLevel(logging.WARNING)
