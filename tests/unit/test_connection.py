"""glmfleet.connection's parts that need no fleet: what paramiko's log keeps. The channels
themselves are tested over real SSH in tests/test_deploy_fleet.py."""

from __future__ import annotations

import logging

from paramiko.common import (
    CONNECTION_FAILED_CODE,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_CONNECT_FAILED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
)

import glmfleet.connection  # noqa: F401  (installs the filter on paramiko's logger)


def open_failed(chanid: int, reason: str, code: int) -> str:
    """paramiko's line for a refused channel, as its transport formats it."""
    return f"Secsh channel {chanid:d} open FAILED: {reason}: {CONNECTION_FAILED_CODE[code]}"


def test_paramiko_does_not_print_the_refusals_that_are_answers(caplog):
    kept = [open_failed(5, "", OPEN_FAILED_RESOURCE_SHORTAGE), "Exception (client): Error reading SSH protocol banner"]
    with caplog.at_level(logging.ERROR):
        log = logging.getLogger("paramiko.transport")
        log.error(open_failed(3, "Connection refused", OPEN_FAILED_CONNECT_FAILED))
        log.error(open_failed(4, "open failed", OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED))
        for line in kept:
            log.error(line)
        log.error("a %s line", "formatted")  # other records pass untouched
    assert [record.getMessage() for record in caplog.records] == [*kept, "a formatted line"]
