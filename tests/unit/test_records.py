"""shared/records.py: records are frozen to the type checker and compare and hash as frozen
dataclasses at run time (so a record stays usable as a key)."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from pathlib import Path

import mypy.api

from arqonbus_server.shared import records
from arqonbus_server.shared.subjects import ChannelRef


def test_a_record_compares_and_hashes_as_the_frozen_dataclass_did() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class FrozenRef:
        tenant: str
        room: str
        channel: str

    ref = ChannelRef("t", "r", "c")
    assert ref == ChannelRef("t", "r", "c")
    assert ref != ChannelRef("t", "r", "d")
    assert hash(ref) == hash(ChannelRef("t", "r", "c")) == hash(FrozenRef("t", "r", "c"))
    assert {ref: 1}[ChannelRef("t", "r", "c")] == 1
    assert dataclasses.replace(ref, channel="d") == ChannelRef("t", "r", "d")
    assert not hasattr(ref, "__dict__")  # slotted: no per-instance dict


def test_mypy_refuses_an_assignment_to_a_field_of_a_record(tmp_path: Path) -> None:
    shutil.copy(records.__file__, tmp_path / "records.py")
    use = tmp_path / "use.py"
    use.write_text(
        textwrap.dedent(
            """\
            from records import record

            @record
            class Point:
                x: int
                y: int

            point = Point(1, 2)
            point.x = 3
            """
        )
    )
    config = tmp_path / "mypy.ini"  # not the project's: this checks use.py alone
    config.write_text("[mypy]\n")
    stdout, stderr, status = mypy.api.run(
        [
            "--config-file",
            str(config),
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "c"),
            str(use),
        ]
    )
    assert status == 1, stdout + stderr
    assert 'use.py:9: error: Property "x" defined in "Point" is read-only' in stdout, stdout
