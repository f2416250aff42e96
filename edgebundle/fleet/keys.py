"""Every Redis key of the fleet, in one place (the sync keys are in edgebundle.sync.keys).

A device's keys carry the hash tag ``{dev:<id>}`` (docs/api.md), so a per-device ACL
user can be limited to ``eb:dev:{dev:<id>}:*`` and Redis Cluster keeps them in one
slot; the fleet's own keys carry ``{fleet:<name>}``::

    eb:dev:{dev:D}:info        hash    fleet, labels (JSON), agent version, registered_at
    eb:dev:{dev:D}:hb          string  heartbeat JSON, with a TTL (gone = offline)
    eb:dev:{dev:D}:desired     string  DesiredState JSON (controller writes, agent reads)
    eb:dev:{dev:D}:actual      string  ActualState JSON (agent writes, controller reads)
    eb:dev:{dev:D}:nudge       channel pub/sub nudge "desired changed" (only a hint: the
                                       agent also polls desired by its generation)
    eb:fleet:{fleet:F}:devices  set    device ids registered in fleet F (agents SADD)
    eb:fleet:{fleet:F}:revs     hash   revision id -> Revision JSON
    eb:fleet:{fleet:F}:rollout  string Rollout JSON (the controller's durable progress)
    eb:fleet:{fleet:F}:paused   string present = the rollout is paused (pause/resume)
    eb:fleet:{fleet:F}:lock     string the controller's lease (one controller at a time)

Ids are validated (edgebundle.sync.keys.check_id) so they cannot break out of a tag.
"""

from __future__ import annotations

from edgebundle.sync.keys import PREFIX, check_id


def _dev(device_id: str) -> str:
    return f"{PREFIX}:dev:{{dev:{check_id('device', device_id)}}}"


def _fleet(name: str) -> str:
    return f"{PREFIX}:fleet:{{fleet:{check_id('fleet', name)}}}"


def device_prefix(device_id: str) -> str:
    """The prefix of every key of one device (for its ACL user's key pattern)."""
    return f"{_dev(device_id)}:"


def device_info(device_id: str) -> str:
    return f"{_dev(device_id)}:info"


def heartbeat(device_id: str) -> str:
    return f"{_dev(device_id)}:hb"


def desired(device_id: str) -> str:
    return f"{_dev(device_id)}:desired"


def actual(device_id: str) -> str:
    return f"{_dev(device_id)}:actual"


def nudge(device_id: str) -> str:
    return f"{_dev(device_id)}:nudge"


def fleet_prefix(name: str) -> str:
    return f"{_fleet(name)}:"


def fleet_devices(name: str) -> str:
    return f"{_fleet(name)}:devices"


def revisions(name: str) -> str:
    return f"{_fleet(name)}:revs"


def rollout(name: str) -> str:
    return f"{_fleet(name)}:rollout"


def paused(name: str) -> str:
    return f"{_fleet(name)}:paused"


def controller_lock(name: str) -> str:
    return f"{_fleet(name)}:lock"
