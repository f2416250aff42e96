"""Fleet: manifests, the device agent, the rollout controller and per-device Redis ACLs.

One module per noun: :mod:`keys` (every fleet key name), :mod:`state` (the JSON
documents kept in Redis: revisions, a device's desired and actual state, heartbeats,
the rollout), :mod:`manifest` (the YAML schema and its validation), :mod:`agent`,
:mod:`controller`, :mod:`acl`.
"""
