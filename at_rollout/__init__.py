"""The rollout side: the client and weight sync the trainer uses, and the project's server.

Client side (what the trainer imports): `client.RolloutClient` / `client.Sample`,
`protocol` (the wire fields, pure Python), `backends.get_backend` (the one place a backend is
chosen: `own_server.py`, `sglang.py`), `transports` (one class per weight transport),
`weight_sync.WeightSync`, `dispatch.Dispatcher`, `placement.resolve`. Server side
(`at_rollout/server/`, never imported by the trainer): `python -m at_rollout.server`.
Modules are imported from where they live, so `import at_rollout` stays light. See
docs/rollout.md.
"""
