"""The delivery promise as a hypothesis state machine over a real mesh (see chaos/model.py).

Subscribers, publishers, dropped connections, explicit resumes, gateway kills (-9) and NATS
node kills (-9) in random order; after every step each subscriber's delivered sequence must
be a prefix of its channel's acked sequence, and once the mesh settles, all of it.
``make chaos`` runs the same machine longer (``python -m chaos.statemachine``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from chaos.model import BusMachine, Mesh

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A 3-node R3 cluster and 3 gateway processes, once for all examples."""
    started = Mesh(Path(tmp_path_factory.mktemp("statemachine")), gateways=3)
    started.start()
    try:
        yield started
    finally:
        started.stop()


MACHINE_SETTINGS = settings(
    max_examples=6,
    stateful_step_count=12,
    deadline=None,
    # Each step talks to real processes; a failing run prints its steps as found, since
    # shrinking would replay many runs against the mesh within the test's time limit.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=list(HealthCheck),
    database=None,
)


def test_delivered_is_always_a_prefix_of_acked(mesh: Mesh) -> None:
    BusMachine.mesh = mesh
    try:
        run_state_machine_as_test(BusMachine, settings=MACHINE_SETTINGS)
    except BaseException as exc:
        # Hypothesis replays a failing example, and the replay of real processes can go
        # differently (reported as Flaky): show the first failure as it happened.
        first = mesh.failures[0] if mesh.failures else None
        if first is None:
            raise
        logs = "\n---\n".join(tail[-1500:] for tail in first["gateway_logs"])
        raise AssertionError(
            f"{first['error']}\nmodel: {first['model']}\ngateway logs:\n{logs}"
        ) from exc
    finally:
        BusMachine.mesh = None
    stats = mesh.stats
    # The run must have exercised the mesh, not just passed trivially.
    print("state machine:", stats.as_dict())
    assert stats.examples >= 6
    assert stats.publishes > 0
    assert stats.presence_checks > 0  # presence was checked against the model (no ghosts)
