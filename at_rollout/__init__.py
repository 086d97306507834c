"""The rollout side: generation, the SGLang-compatible server, its client, weight sync.

Entry points (imported from their modules, so `import at_rollout` stays light):
`generator.Generator`, `generator.logprob_temperature`, `client.RolloutClient`,
`process.LocalServer`, `sglang.SGLangServer`, `weight_sync.WeightSync`; the server is
`python -m at_rollout.server`. See docs/rollout.md.
"""
