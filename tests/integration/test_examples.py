"""The seed's four scenarios, as shipped in examples/, each run against a real dev mesh
(``arqonbus dev``: 3 NATS JetStream nodes and 2 gateway processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import shlex
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from arqonbus import Client
from tests.integration.test_dev import (
    GATEWAY_LINE,
    free_port_run,
    pids_running_with,
    read_banner,
    start_dev,
    stop_leftovers,
)
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SDK_README = REPO / "clients" / "python" / "README.md"


@dataclass
class Mesh:
    urls: list[str]

    @property
    def csv(self) -> str:
        return ",".join(self.urls)

    def reversed_csv(self) -> str:
        return ",".join(reversed(self.urls))


@pytest.fixture(scope="module")
async def dev_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp("examples")
    port = free_port_run(2)
    nats_port = free_port_run(3, avoid=range(port, port + 2))
    data_dir = (tmp / "dev").resolve()
    stderr = tmp / "dev.stderr"
    proc = await start_dev(port, nats_port, data_dir, stderr)
    children: list[int] = []
    try:
        banner = await read_banner(proc, stderr, timeout=60 * SEC)
        gateways = GATEWAY_LINE.findall(banner)
        children = [int(pid) for _, pid in gateways]
        children += pids_running_with(str(data_dir), besides=proc.pid)
        yield Mesh([url for url, _ in gateways])
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 40 * SEC) == 0
    finally:
        await stop_leftovers(proc, children)


@pytest.fixture
def demo_tenant() -> str:
    return "ex" + uuid.uuid4().hex[:10]


class Example:
    """One example script as a child process, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls, script: str, *args: str, stdin: bool = False, stdin_fd: int | None = None
    ) -> Example:
        """stdin: a pipe (``stdin=True``), the descriptor ``stdin_fd``, else /dev/null."""
        if stdin_fd is None:
            stdin_fd = asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / script), *args,
            stdin=stdin_fd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=REPO, start_new_session=True,
        )  # fmt: skip
        return cls(proc)

    async def wait_line(self, pattern: str, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        for line in self.lines:
            if re.search(pattern, line):
                return line
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"exited before {pattern!r}: {await self.finish()}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if re.search(pattern, line):
                    return line

    async def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for the exit; return code, all stdout and stderr."""
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.lines += out.decode().splitlines()
        assert self.proc.returncode is not None
        return self.proc.returncode, "\n".join(self.lines), err.decode()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError, ValueError):
            await self.proc.communicate()


@contextlib.asynccontextmanager
async def running(
    script: str, *args: str, stdin: bool = False, stdin_fd: int | None = None
) -> AsyncIterator[Example]:
    example = await Example.start(script, *args, stdin=stdin, stdin_fd=stdin_fd)
    try:
        yield example
    finally:
        await example.kill()


async def run(script: str, *args: str, stdin: bytes | None = None) -> str:
    async with running(script, *args, stdin=stdin is not None) as example:
        if stdin is not None:
            assert example.proc.stdin is not None
            example.proc.stdin.write(stdin)
            example.proc.stdin.close()
        code, out, err = await example.finish()
        assert code == 0, f"{script} {args} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
        return out


async def test_example_1_chat_between_two_gateways(dev_mesh: Mesh, demo_tenant: str) -> None:
    common = ["--tenant", demo_tenant, "--room", "science", "--channel", "general"]
    async with running(
        "chat.py", "--name", "bob", "--url", dev_mesh.reversed_csv(), "--exit-after", "2",
        *common, stdin=True,
    ) as bob:  # fmt: skip
        await bob.wait_line(r"^\* bob joined science/general$")
        assert bob.proc.stdin is not None
        bob.proc.stdin.close()  # bob only listens
        alice = await run(
            "chat.py", "--name", "alice", "--url", dev_mesh.csv, *common,
            stdin=b"Hello everyone!\nhow is the experiment going?\n",
        )  # fmt: skip
        assert "[alice] Hello everyone!" in alice
        code, out, err = await bob.finish()
        assert code == 0, err
    heard = re.findall(r"^\[alice\] (.*)  \(#(\d+)\)$", out, re.M)
    assert [text for text, _ in heard] == ["Hello everyone!", "how is the experiment going?"]
    assert int(heard[0][1]) < int(heard[1][1])
    assert out.rstrip().endswith("* bob left")


@pytest.mark.parametrize("source", ["devnull", "file", "pipe", "tty"])
async def test_example_1_chat_leaves_at_the_end_of_any_stdin(
    dev_mesh: Mesh, demo_tenant: str, source: str, tmp_path: Path
) -> None:
    lines = [] if source == "devnull" else ["first line", "second line"]
    text = "".join(f"{line}\n" for line in lines).encode()
    channel = f"stdin-{source}"
    args = ["--name", "carol", "--tenant", demo_tenant, "--url", dev_mesh.csv,
            "--room", "science", "--channel", channel]  # fmt: skip
    with contextlib.ExitStack() as fds:
        stdin_fd: int | None = None  # /dev/null
        if source == "file":
            (tmp_path / "input").write_bytes(text)
            stdin_fd = fds.enter_context((tmp_path / "input").open("rb")).fileno()
        elif source == "tty":
            controller, stdin_fd = pty.openpty()
            for fd in (controller, stdin_fd):
                fds.callback(os.close, fd)
            os.write(controller, text + b"\x04")  # Ctrl-D at the start of a line: end of input
        async with running("chat.py", *args, stdin=source == "pipe", stdin_fd=stdin_fd) as chat:
            if source == "pipe":
                assert chat.proc.stdin is not None
                chat.proc.stdin.write(text)
                chat.proc.stdin.close()
            code, out, err = await chat.finish(timeout=30 * SEC)
        if source == "tty":
            # The terminal's O_NONBLOCK is shared with the shell: chat.py must give it back.
            assert os.get_blocking(stdin_fd), "chat.py left the terminal non-blocking"

    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Exception in callback" not in err, err
    assert out.startswith(f"* carol joined science/{channel}\n"), out
    assert out.rstrip().endswith("* carol left"), out
    async with Client(dev_mesh.urls, f"dev:{demo_tenant}:checker") as checker:
        stored = await checker.history("science", channel).list()
    assert [(e.from_, e.payload) for e in stored] == [("carol", {"message": m}) for m in lines]


async def test_example_2_telemetry_services_and_a_dashboard(
    dev_mesh: Mesh, demo_tenant: str
) -> None:
    base = ["--tenant", demo_tenant, "--url", dev_mesh.csv]
    async with running("telemetry.py", "dashboard", "--samples", "12", *base) as dashboard:
        await dashboard.wait_line("waiting for metrics")
        await asyncio.gather(
            run("telemetry.py", "service", "--name", "api", "--count", "2", "--interval", "0.05", *base),
            run("telemetry.py", "service", "--name", "worker", "--count", "2", "--interval", "0.05",
                "--tenant", demo_tenant, "--url", dev_mesh.reversed_csv()),
        )  # fmt: skip
        code, out, err = await dashboard.finish()
    assert code == 0, err
    assert "samples=12" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-2:]}
    assert set(rows) == {"api", "worker"}
    assert all(len(values) == 3 and "-" not in values for values in rows.values()), out


async def test_example_2_demo_in_one_process(dev_mesh: Mesh, demo_tenant: str) -> None:
    out = await run(
        "telemetry.py", "demo", "--count", "2", "--tenant", demo_tenant, "--url", dev_mesh.csv
    )
    assert "samples=12" in out
    assert re.search(r"^api\s", out, re.M) and re.search(r"^worker\s", out, re.M), out


async def test_example_3_agents_coordinate_with_metadata(dev_mesh: Mesh, demo_tenant: str) -> None:
    out = await run("agents.py", "--steps", "3", "--tenant", demo_tenant, "--url", dev_mesh.csv)
    lines = [line for line in out.splitlines() if line.startswith("#")]
    # announce, plan, 3 assignments, 3 reports, phase done
    assert len(lines) == 9, out
    assert "research_agent_1  [analytical/high] Starting analysis phase" in lines[0]
    assert "research_agent_2  [creative/high] Acknowledged; here is my plan" in lines[1]
    assert lines[-1].endswith("Analysis phase complete")
    assert "coordination done: 9 messages, seqs in order: True" in out


async def test_example_4_database_service_answers_the_api_across_gateways(
    dev_mesh: Mesh, demo_tenant: str
) -> None:
    base = ["--tenant", demo_tenant, "--url", dev_mesh.csv]
    async with running("services.py", "db", "--name", "db_1", *base) as db:
        await db.wait_line("db_1: serving status on services/database")
        out = await run("services.py", "api", "--calls", "3", *base)
        db.proc.send_signal(signal.SIGTERM)
        code, db_out, err = await db.finish()
        assert code == 0, err
    answers = re.findall(r"^api: status\((\w+)\) -> (\{.*\})", out, re.M)
    assert [check for check, _ in answers] == ["connection_pool", "connection_pool", "replication"]
    assert all('"service": "db_1"' in body for _, body in answers)
    assert "api: status(disk) -> error unknown_check" in out
    assert db_out.count("db_1: status(") == 4
    # With the service gone, the API is told at once.
    after = await run("services.py", "api", "--calls", "1", *base)
    assert "no database service is running" in after


async def test_example_4_demo_in_one_process(dev_mesh: Mesh, demo_tenant: str) -> None:
    out = await run(
        "services.py", "demo", "--calls", "2", "--tenant", demo_tenant, "--url", dev_mesh.csv
    )
    assert len(re.findall(r"^api: status\(connection_pool\) -> ", out, re.M)) == 2, out


def documented_arq_cmd() -> list[str]:
    """The ``arq cmd`` line of the SDK README's command-line section, as argv."""
    commands = [
        shlex.split(line, comments=True)
        for line in SDK_README.read_text().splitlines()
        if line.startswith("arq cmd ")
    ]
    assert len(commands) == 1, commands
    return commands[0]


async def test_the_readmes_arq_cmd_works_against_example_4(
    dev_mesh: Mesh, demo_tenant: str
) -> None:
    argv = documented_arq_cmd()
    assert argv[:5] == ["arq", "cmd", "services", "database", "status"], argv
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    # The README runs against make run (its URLs, tenant demo): here the test mesh and tenant.
    env |= {"ARQONBUS_URL": dev_mesh.csv, "ARQONBUS_TOKEN": f"dev:{demo_tenant}:arq"}
    base = ["--tenant", demo_tenant, "--url", dev_mesh.csv]
    async with running("services.py", "db", "--name", "db_1", *base) as db:
        await db.wait_line("db_1: serving status on services/database")
        arq = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus.cli", *argv[1:],
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(arq.communicate(), 30 * SEC)
        finally:
            if arq.returncode is None:
                arq.kill()
                await arq.wait()
    assert (arq.returncode, err.decode()) == (0, ""), out
    result = orjson.loads(out)
    assert result["service"] == "db_1" and "active_connections" in result, result
