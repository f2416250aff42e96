"""Fleet: manifests, the device agent, the rollout controller and per-device Redis ACLs.

One module per noun:

- documents and names: :mod:`edgebundle.keys` (every key name), :mod:`documents` (the typed
  JSON documents kept in Redis: revisions, a device's desired and actual state,
  heartbeats, the rollout), :mod:`wire` (their one JSON encoding, and revision ids);
- the manifest: :mod:`manifest` (the schema), :mod:`manifest_file` (reading a file,
  every problem located), :mod:`yaml_loader` (position-keeping YAML),
  :mod:`durations` (the one duration grammar);
- the controller side: :mod:`store` (Redis reads/writes and the fleet's functions),
  :mod:`selection` and :mod:`rules` (pure rollout arithmetic and decisions: no Redis,
  no clock), :mod:`operator` (plan/apply/status/pause/resume/rollback/wait),
  :mod:`controller` (the run loop);
- the device side: :mod:`agent` (the reconcile loop), :mod:`device` (its Redis
  protocol), :mod:`staging` (its revision files), :mod:`wasmedge` (the WasmEdge a
  revision pins), :mod:`credentials` (its login on a revision's sync Redis); its
  served ``run`` is :mod:`edgebundle.runtime.run_child`;
- access: :mod:`acl` (per-device users), :mod:`proxy`, :mod:`proxy_session`,
  :mod:`resp` (the sync proxy).
"""
