"""Reading the settings: the environment and flags, then the files the settings name.

The settings model and its pure rules are in shared/settings.py; this is the one place that
reads ``os.environ`` for them, and checks (once, at start-up) that the NATS credential and TLS
files and the content-policy file can be used.
"""

from __future__ import annotations

import os
from typing import Any

from arqonbus_server.gateway.policies import policy_for
from arqonbus_server.mesh.nats_auth import check_files
from arqonbus_server.shared.inspect import PolicyError
from arqonbus_server.shared.settings import ConfigError, Settings, settings_from


def load_settings(**overrides: Any) -> Settings:
    """Settings from the ``ARQONBUS_*`` environment with ``overrides`` (flags; None = not
    given) on top, their files checked. Raises ConfigError naming the variable and the fix."""
    settings = settings_from(os.environ, **overrides)
    try:
        check_files(settings)
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None
    try:
        policy_for(settings.policy_file)  # read and validated once; sessions reuse it
    except PolicyError as exc:
        raise ConfigError(f"invalid setting ARQONBUS_POLICY_FILE: {exc}") from None
    return settings
