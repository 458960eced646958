"""The multi-region tests run only from `make test-regions` (ARQONBUS_REGIONS_TEST=1).

They start a whole supercluster (3 regions of 3 NATS nodes and a witness), too slow for the
main suite.
"""

import os

collect_ignore_glob = [] if os.environ.get("ARQONBUS_REGIONS_TEST") == "1" else ["test_*.py"]
