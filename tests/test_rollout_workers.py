"""The trainer's rollout handle against a real server process."""
import pytest

from at_core.config import load_config
from at_core.rollout import RolloutWorkers
from at_rollout.backends.own_server import LocalServer


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = LocalServer(tiny_model_dir).start()
    yield s
    s.stop()


@pytest.mark.parametrize("backend", ["server", "sglang"])
def test_generate_groups_n_samples_per_prompt(server, tiny_model_dir, tmp_path, backend):
    # backend=sglang with urls: the SGLang request shape (one entry and one seed per sample)
    cfg = load_config(overrides=[f"rollout.backend={backend}", f"rollout.urls=[{server.url}]"])
    workers = RolloutWorkers(cfg.rollout, str(tiny_model_dir), tmp_path, rank=0)
    workers.start()
    try:
        prompts = [[1, 5, 9, 11], [1, 7, 7], [1, 20, 21, 22, 23]]
        params = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "n": 3, "sampling_seed": 11}
        out = workers.generate(prompts, params, None)
        assert [len(g) for g in out] == [3, 3, 3]
        assert all(s.prompt_index in (0, 1, 2) for g in out for s in g)
        again = workers.generate(prompts, params, None)
        assert [[s.output_ids for s in g] for g in out] == [[s.output_ids for s in g] for g in again]
        assert len({tuple(s.output_ids) for g in out for s in g}) > 3  # samples are not copies of each other
    finally:
        workers.close()


def test_launch_plan_splits_the_trainer_threads_across_engines():
    from at_core.rollout import launch_plan

    def plan(engines, engine_threads, trainer_threads):
        cfg = load_config(overrides=[f"rollout.engines={engines}", f"rollout.engine_threads={engine_threads}"])
        return launch_plan(cfg.rollout, trainer_threads)

    assert plan(1, 0, 8) == (1, None)  # one engine inherits the environment's threads, as before
    assert plan(0, 0, 2) == (2, 1) and plan(0, 0, 1) == (1, None)  # one single-threaded engine per thread
    assert plan(2, 0, 8) == (2, 4) and plan(4, 0, 2) == (4, 1) and plan(2, 3, 8) == (2, 3)


@pytest.mark.parametrize("overrides, match", [
    (["rollout.engines=-1"], "rollout.engines' must be >= 0"),
    (["rollout.engine_threads=-2"], "rollout.engine_threads' must be >= 0"),
    (["rollout.backend=sglang", "rollout.engines=2"], "rollout.engines' must be 1 with rollout.backend=sglang"),
])
def test_bad_engine_counts_name_the_key(overrides, match):
    from at_core.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)
