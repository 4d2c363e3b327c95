"""Shared test settings."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_access_log() -> None:
    """Access lines go through logging; keep them out of captured output noise."""
    logging.getLogger("gateway.access").setLevel(logging.WARNING)
