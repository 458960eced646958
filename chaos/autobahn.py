"""The gateway's WebSocket layer against the Autobahn|Testsuite fuzzing client.

``python -m chaos.autobahn --json OUT [--long]``

An echo server is built on ``gateway.transport.start_server`` with the options the
Gateway listens with (``gateway.server.listen_options``); every message comes back with its
type (text as text, binary as binary). Autobahn|Testsuite 0.8.2 (``wstest -m
fuzzingclient``, Python 2.7) drives it on 127.0.0.1 and its report (index.json) is
counted per case group.

A case may fail only because of a deliberate limit: a message above the gateway's
maximum message size (2 x max_envelope_bytes, 128 KiB by default) is refused with
close 1009, and so is a message in more than MAX_FRAGMENTS (256) fragments. Such cases
are listed with the reason; any other FAILED case fails the run.
Compression (permessage-deflate) is off on purpose (frames are framed once and shared
by every subscriber), so the 12.x/13.x cases report UNIMPLEMENTED.

The test suite is installed once, with pip, into .chaos/autobahn/site-<hash>/ and
reused afterwards. Python 2.7 is looked up in $ARQONBUS_PYTHON27,
~/.pyenv/versions/2.7.18/bin/python, then python2.7 on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from arqonbus_server.gateway.app import listen_options
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.gateway.ws.transport import MAX_FRAGMENTS, Server, Socket, start_server
from arqonbus_server.shared.settings import Settings
from chaos.suite import finish, parse_suite_args

ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = ROOT / ".chaos" / "autobahn"

# The whole dependency set, pinned: these are the last releases that run on Python 2.7
# together (autobahntestsuite 0.8.2 needs autobahn 0.10.9, which needs Twisted < 21).
PINS = (
    "autobahntestsuite==0.8.2",
    "autobahn[twisted,accelerate]==0.10.9",
    "Twisted==20.3.0",
    "txaio==2.1.0",
    "zope.interface==5.5.2",
    "Automat==22.10.0",
    "attrs==21.4.0",
    "constantly==15.1.0",
    "incremental==22.10.0",
    "hyperlink==21.0.0",
    "PyHamcrest==1.10.1",
    "idna==2.10",
    "typing==3.10.0.0",
    "klein==20.6.0",
    "Tubes==0.2.1",
    "Werkzeug==1.0.1",
    "Jinja2==2.11.3",
    "MarkupSafe==1.1.1",
    "pyOpenSSL==21.0.0",
    "cryptography==3.3.2",
    "cffi==1.15.1",
    "pycparser==2.21",
    "enum34==1.1.10",
    "ipaddress==1.0.23",
    "six==1.17.0",
    "service-identity==21.1.0",
    "pyasn1==0.5.1",
    "pyasn1-modules==0.3.0",
    "unittest2==1.1.0",
    "argparse==1.4.0",
    "linecache2==1.0.0",
    "traceback2==1.4.0",
    "wsaccel==0.6.6",
    "ujson==2.0.3",
    "setuptools==44.1.1",
)

SHORT_CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*")
LONG_CASES = (*SHORT_CASES, "9.*", "10.*", "12.1.*", "13.1.*", "13.7.*")
SHORT_TIMEOUT_S = 300.0
LONG_TIMEOUT_S = 900.0
INSTALL_TIMEOUT_S = 900.0

STATUSES = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
_RANK = {status: i for i, status in enumerate(STATUSES)}

# Runs wstest from the install dir. site.addsitedir (not PYTHONPATH) so that the
# namespace-package .pth files in it (zope.*) are processed.
_LAUNCHER = (
    "import site, sys; site.addsitedir(sys.argv[1]); "
    "sys.argv = ['wstest'] + sys.argv[2:]; "
    "from autobahntestsuite.wstest import run; run()"
)
_PROBE = (
    "import site, sys; site.addsitedir(sys.argv[1]); "
    "import autobahn, autobahntestsuite, twisted; from autobahntestsuite import wstest; "
    "print(autobahntestsuite.__version__, autobahn.__version__, twisted.__version__)"
)


class AutobahnUnavailable(RuntimeError):
    """Python 2.7 or the Autobahn|Testsuite install is missing and could not be made."""


# -- the test suite install --------------------------------------------------------------


def find_python27() -> str:
    candidates = [
        os.environ.get("ARQONBUS_PYTHON27", ""),
        str(Path.home() / ".pyenv" / "versions" / "2.7.18" / "bin" / "python"),
        shutil.which("python2.7") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AutobahnUnavailable(
        "Python 2.7 not found (Autobahn|Testsuite 0.8.2 runs only on it): set "
        "ARQONBUS_PYTHON27, or install it with `pyenv install 2.7.18`"
    )


def _site_dir() -> Path:
    digest = hashlib.sha256("\n".join(PINS).encode()).hexdigest()[:10]
    return WORK_DIR / f"site-{digest}"


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with open(WORK_DIR / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it


async def _run(
    argv: list[str], timeout: float, log: Path, cwd: Path | None = None
) -> tuple[int, float]:
    """Run a child with no stdin and its output in ``log``; kill its process group on timeout."""
    started = time.monotonic()
    with _open_log(log) as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"},
            start_new_session=True,
        )
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            raise
    return code, time.monotonic() - started


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Install:
    python: str
    site: Path
    versions: str
    installed_now: bool
    seconds: float


async def ensure_installed() -> Install:
    """The pinned Autobahn|Testsuite in .chaos/autobahn/site-<hash>/, installed if missing."""
    python = find_python27()
    site = _site_dir()
    started = time.monotonic()
    installed_now = False
    with _install_lock():
        if not (site / ".installed").exists():
            installed_now = True
            staging = site.with_name(site.name + f".tmp{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            log = WORK_DIR / "install.log"
            argv = [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
            argv += ["--no-warn-script-location", "--target", str(staging), *PINS]
            try:
                code, _ = await _run(argv, INSTALL_TIMEOUT_S, log)
            except TimeoutError:
                raise AutobahnUnavailable(f"pip install timed out; see {log}") from None
            if code != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise AutobahnUnavailable(f"pip install failed ({code}):\n{_tail(log)}")
            shutil.rmtree(site, ignore_errors=True)
            staging.rename(site)
        probe_log = WORK_DIR / "probe.log"
        code, _ = await _run([python, "-c", _PROBE, str(site)], 120, probe_log)
        versions = _tail(probe_log).strip().splitlines()[-1:] or [""]
        if code != 0:
            raise AutobahnUnavailable(f"the install in {site} does not import:\n{_tail(probe_log)}")
        (site / ".installed").write_text(versions[0] + "\n")
    return Install(python, site, versions[0], installed_now, time.monotonic() - started)


# -- the echo server on the gateway's WebSocket layer ------------------------------------


def _accept(path: str, headers: Mapping[str, str], peer_ip: str) -> object:
    return True  # any upgrade is accepted; the context is unused


async def _echo(context: object, socket: Socket) -> None:
    """Every message back with its own type, until the close."""
    while (message := await socket.recv_message()) is not None:
        payload, is_text = message
        if is_text:
            socket.send(payload)
        else:
            socket.send_binary(payload)


async def start_echo_server(settings: Settings | None = None, port: int = 0) -> Server:
    options = listen_options(settings or load_settings(), "127.0.0.1", port)
    return await start_server(options, _accept, _echo)


# -- the run ------------------------------------------------------------------------------


def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def group_of(case_id: str) -> str:
    return case_id.split(".", 1)[0]


@dataclass
class CaseResult:
    case: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    remote_close_reason: str
    description: str
    largest_message: int  # the largest data message the test suite sent, in bytes

    @property
    def status(self) -> str:
        """The case's behaviour, made worse by a bad closing behaviour.

        A failed or unclean close fails the case; a close code other than the one the
        specification prefers makes it NON-STRICT (as the test suite's own report shows it).
        """
        status = self.behavior if self.behavior in _RANK else "FAILED"
        if status in ("FAILED", "UNIMPLEMENTED"):
            return status
        if self.behavior_close in ("FAILED", "UNCLEAN"):
            return "FAILED"
        if self.behavior_close == "WRONG CODE":
            return max(status, "NON-STRICT", key=_RANK.__getitem__)
        return status


@dataclass
class Report:
    long: bool
    cases: list[CaseResult]
    max_message_bytes: int
    install: dict[str, Any] = field(default_factory=dict)
    wstest_seconds: float = 0.0
    requested: tuple[str, ...] = ()

    def deliberate_limit(self, case: CaseResult) -> str | None:
        """Why a FAILED case fails only because of a deliberate limit, or None."""
        if case.status != "FAILED":
            return None
        if case.remote_close_code == 1009 and case.largest_message > self.max_message_bytes:
            return (
                f"a {case.largest_message}-byte message is above the "
                f"{self.max_message_bytes}-byte maximum: closed 1009 "
                f"({case.remote_close_reason or 'message too big'})"
            )
        return None

    @property
    def limited(self) -> list[tuple[CaseResult, str]]:
        out = []
        for case in self.cases:
            reason = self.deliberate_limit(case)
            if reason is not None:
                out.append((case, reason))
        return out

    @property
    def unexpected(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "FAILED" and self.deliberate_limit(c) is None]

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for case in self.cases:
            row = table.setdefault(group_of(case.case), dict.fromkeys(STATUSES, 0))
            row[case.status] += 1
        return dict(sorted(table.items(), key=lambda kv: int(kv[0])))

    @property
    def missing_groups(self) -> list[str]:
        have = set(self.counts())
        return [
            g for g in dict.fromkeys(p.split(".", 1)[0] for p in self.requested) if g not in have
        ]

    @property
    def passed(self) -> bool:
        return bool(self.cases) and not self.unexpected and not self.missing_groups

    def summary_md(self) -> str:
        limited = {c.case for c, _ in self.limited}
        lines = [
            "### Autobahn|Testsuite (fuzzingclient) against the gateway's WebSocket layer",
            "",
            f"Cases: {', '.join(self.requested)}; {len(self.cases)} run; maximum message "
            f"{self.max_message_bytes} bytes; compression not offered.",
            "",
            "| group | OK | non-strict | informational | unimplemented | failed | of which deliberate limit |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for group, row in self.counts().items():
            lim = sum(1 for c in self.cases if group_of(c.case) == group and c.case in limited)
            cells = " | ".join(str(row[s]) for s in STATUSES)
            lines.append(f"| {group} | {cells} | {lim} |")
        total = dict.fromkeys(STATUSES, 0)
        for row in self.counts().values():
            for s in STATUSES:
                total[s] += row[s]
        cells = " | ".join(str(total[s]) for s in STATUSES)
        lines.append(f"| all | {cells} | {len(limited)} |")
        if self.limited:
            lines += [
                "",
                "FAILED only because of a deliberate limit (closed 1009, message too big):",
                "",
            ]
            by_group: dict[str, list[CaseResult]] = {}
            for case, _ in self.limited:
                by_group.setdefault(".".join(case.case.split(".")[:2]), []).append(case)
            for cases in by_group.values():
                sizes = sorted({c.largest_message for c in cases})
                size = _size(sizes[0]) + (f" to {_size(sizes[-1])}" if len(sizes) > 1 else "")
                why = Counter(_why(c.remote_close_reason) for c in cases)
                lines.append(
                    f"- {', '.join(c.case for c in cases)}: messages of {size}, above the "
                    f"{_size(self.max_message_bytes)} maximum; closed for "
                    + ", ".join(f"{reason} ({n})" for reason, n in why.items())
                )
        if self.unexpected:
            lines += ["", "**Unexpected FAILED cases:**", ""]
            for case in self.unexpected:
                lines.append(
                    f"- {case.case}: behavior {case.behavior}, close {case.behavior_close}, "
                    f"remote close code {case.remote_close_code}: {case.description}"
                )
        if self.missing_groups:
            lines += ["", f"**No result for case groups {', '.join(self.missing_groups)}.**"]
        unimpl = [c.case for c in self.cases if c.status == "UNIMPLEMENTED"]
        if unimpl:
            lines += [
                "",
                f"UNIMPLEMENTED ({len(unimpl)}): {_ranges(unimpl)}: permessage-deflate is not "
                "offered (frames are framed once and shared by every subscriber).",
            ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": "autobahn",
            "passed": self.passed,
            "summary_md": self.summary_md(),
            "details": {
                "long": self.long,
                "cases_requested": list(self.requested),
                "cases_run": len(self.cases),
                "max_message_bytes": self.max_message_bytes,
                "counts": self.counts(),
                "deliberate_limit": {c.case: reason for c, reason in self.limited},
                "unexpected_failed": [c.case for c in self.unexpected],
                "missing_groups": self.missing_groups,
                "non_strict": [c.case for c in self.cases if c.status == "NON-STRICT"],
                "informational": [c.case for c in self.cases if c.status == "INFORMATIONAL"],
                "install": self.install,
                "wstest_seconds": round(self.wstest_seconds, 1),
            },
        }


def _why(reason: str) -> str:
    """The gateway's 1009 reason, shortened: the size limit or the fragment limit."""
    if "fragments" in reason:
        return f"more than {MAX_FRAGMENTS} fragments"
    return "size" if "exceeds limit" in reason else (reason or "no reason")


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _ranges(cases: list[str]) -> str:
    """'12.1.1, 12.1.2, ...' shortened to the groups they belong to."""
    groups = dict.fromkeys(".".join(c.split(".")[:2]) + ".*" for c in cases)
    return ", ".join(groups)


def _largest_message(case_report: Mapping[str, Any]) -> int:
    """The largest data message the fuzzing client sent, from its wire log.

    Outgoing frames are logged as ["TF", [length, payload], opcode, fin, ...]; a message
    is a text/binary frame plus the continuation frames that follow it.
    """
    largest = current = 0
    for entry in case_report.get("wirelog") or []:
        if not entry or entry[0] != "TF":
            continue
        try:
            length, opcode, fin = int(entry[1][0]), int(entry[2]), bool(entry[3])
        except (IndexError, TypeError, ValueError):
            continue
        if opcode in (1, 2):
            current = length
        elif opcode == 0:
            current += length
        else:
            continue
        largest = max(largest, current)
        if fin:
            current = 0
    return largest


_DESCRIBED_SIZE = re.compile(r"payload of length (\d+) \* 2\*\*(\d+)")


def _described_size(description: str) -> int:
    """The message size a case states ("payload of length 4 * 2**20"), or 0.

    The test suite keeps no wire log for its large-message cases (9.x), so their size
    comes from the description.
    """
    match = _DESCRIBED_SIZE.search(description)
    return int(match.group(1)) * 2 ** int(match.group(2)) if match else 0


def parse_report(outdir: Path, agent: str) -> list[CaseResult]:
    index = json.loads((outdir / "index.json").read_text())
    results = []
    for case_id, entry in index.get(agent, {}).items():
        case_report: dict[str, Any] = {}
        report_file = entry.get("reportfile")
        if report_file and (outdir / report_file).exists():
            case_report = json.loads((outdir / report_file).read_text())
        close_code = entry.get("remoteCloseCode")
        description = " ".join(str(case_report.get("description", "")).split())[:300]
        results.append(
            CaseResult(
                case=case_id,
                behavior=str(entry.get("behavior")),
                behavior_close=str(entry.get("behaviorClose")),
                remote_close_code=int(close_code) if close_code is not None else None,
                remote_close_reason=str(case_report.get("remoteCloseReason") or ""),
                description=description,
                largest_message=max(_largest_message(case_report), _described_size(description)),
            )
        )
    results.sort(key=lambda c: _case_key(c.case))
    return results


AGENT = "ArqonBus"


async def run(long: bool = False, workdir: Path | None = None) -> Report:
    """Install (or reuse) the test suite, start the echo server, run wstest, parse its report."""
    install = await ensure_installed()
    cases = LONG_CASES if long else SHORT_CASES
    settings = load_settings()
    run_dir = workdir or WORK_DIR / ("run-long" if long else "run-short")
    shutil.rmtree(run_dir, ignore_errors=True)
    outdir = run_dir / "reports"
    outdir.mkdir(parents=True)
    server = await start_echo_server(settings)
    try:
        port = next(iter(server.sockets)).getsockname()[1]
        spec = {
            "outdir": str(outdir),
            "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}/ws"}],
            "cases": list(cases),
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        spec_path = run_dir / "fuzzingclient.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        log = run_dir / "wstest.log"
        argv = [install.python, "-c", _LAUNCHER, str(install.site), "-m", "fuzzingclient"]
        argv += ["-s", str(spec_path)]
        timeout = LONG_TIMEOUT_S if long else SHORT_TIMEOUT_S
        try:
            code, seconds = await _run(argv, timeout, log, cwd=run_dir)
        except TimeoutError:
            raise RuntimeError(f"wstest did not finish within {timeout:.0f} s; see {log}") from None
        if code != 0 or not (outdir / "index.json").exists():
            raise RuntimeError(f"wstest exited with {code}:\n{_tail(log)}")
    finally:
        server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await server.wait_closed()
    return Report(
        long=long,
        cases=parse_report(outdir, AGENT),
        max_message_bytes=2 * settings.max_envelope_bytes,
        install={
            "python": install.python,
            "site": str(install.site),
            "versions": install.versions,
            "installed_now": install.installed_now,
            "seconds": round(install.seconds, 1),
        },
        wstest_seconds=seconds,
        requested=cases,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_suite_args(
        "python -m chaos.autobahn", __doc__, "all cases (9.x, 10.x, 12.x, 13.x too)", argv
    )
    try:
        report = asyncio.run(run(long=args.long))
        result = report.to_json()
    except (AutobahnUnavailable, RuntimeError) as exc:
        result = {
            "name": "autobahn",
            "passed": False,
            "summary_md": f"### Autobahn|Testsuite\n\nDid not run: {exc}\n",
            "details": {"error": str(exc)},
        }
    return finish(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
