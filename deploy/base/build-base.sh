#!/usr/bin/env bash
# Builds the local Python base image that deploy/Dockerfile starts FROM when no registry is
# reachable: a minimal Debian bookworm rootfs with Debian's python3 (3.11) and python3-venv,
# made by mmdebstrap from Debian's packages and `podman import`ed.
#
# Cached by a hash of its inputs (this script): the image is tagged
# localhost/arqonbus-python-base:<hash>, and its tarball is kept under .build/image-cache/ (git-ignored),
# so a second run (or a `podman system reset`) costs seconds, not minutes.
# Prints the image reference on stdout; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEY=$( { cat "$0"; echo "$SUITE $PACKAGES $MIRROR"; } | sha256sum | cut -c1-12)
IMAGE=localhost/arqonbus-python-base:$KEY
CACHE=.build/image-cache
TARBALL=$CACHE/python-base-$KEY.tar

if podman image exists "$IMAGE"; then
    echo "$IMAGE"
    exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
    echo "==> mmdebstrap $SUITE ($PACKAGES) -> $TARBALL" >&2
    # minbase: essential packages only; no docs, man pages or locales in the image.
    mmdebstrap --variant=minbase --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        --format=tar "$SUITE" "$CACHE/partial-$KEY.tar" "$MIRROR" >&2
    mv "$CACHE/partial-$KEY.tar" "$TARBALL"
fi
echo "==> podman import $TARBALL as $IMAGE" >&2
podman import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$TARBALL" "$IMAGE" >&2
echo "$IMAGE"
