"""The container-image tests run only from `make image-test` (ARQONBUS_IMAGE_TEST=1).

They need podman and an image built by `make image`, so `make test` does not collect them.
"""

import os

collect_ignore_glob = [] if os.environ.get("ARQONBUS_IMAGE_TEST") == "1" else ["test_*.py"]
