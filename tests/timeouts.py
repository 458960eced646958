"""One scale for every timeout in the tests, as websockets' ``MS``.

A test waits on the event it expects, bounded by ``N * SEC``. A slow machine stretches every
bound at once with ``ARQONBUS_TEST_TIMEOUT_FACTOR`` (e.g. 3); no test sleeps to synchronize.
"""

from __future__ import annotations

import os

SEC = float(os.environ.get("ARQONBUS_TEST_TIMEOUT_FACTOR", "1"))
