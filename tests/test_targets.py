"""The tiny run's targets, worked by hand on made-up rows."""
from at_core.tiny import targets


def _row(name, acc, tokens, think):
    return {"name": name, "accuracy": acc, "mean_tokens": tokens,
            "tiers": {t: {"think_rate": r} for t, r in zip(("easy", "medium", "hard"), think)}}


ROWS = [_row("base/standard", 0.95, 90.0, (1, 1, 1)), _row("stage1", 0.85, 40.0, (0.3, 0.19, 0.6)),
        _row("stage2", 0.97, 35.0, (0, 0, 0.95)), _row("stage3", 0.945, 32.0, (0, 0, 1.0))]


def test_each_target_reads_its_rows():
    got = {c["name"]: (c["value"], c["met"]) for c in targets.check(ROWS)}
    assert got["accuracy"] == (-0.5, True)  # 94.5 against 95.0: within the point
    assert got["tokens"] == (round(32 / 90, 4), True)
    assert got["think_by_difficulty"] == (1.0, True)
    assert got["stage1_alive_medium"] == (0.19, False)  # below 0.2
    assert got["stage1_hard_over_easy"] == (0.3, True)
    assert got["stage2_accuracy_up"] == (12.0, True)
    assert got["stage3_tokens_down"] == (-3.0, True)
    assert got["stage3_accuracy_kept"] == (-2.5, False)
    md = targets.markdown(targets.check(ROWS))
    assert "| stage1 think rate on medium in [0.2, 0.8] | +0.190 | **no** |" in md


def test_a_run_without_a_stage_says_n_a_instead_of_failing():
    checks = targets.check([r for r in ROWS if r["name"] != "stage1"])
    missing = {c["name"] for c in checks if c["met"] is None}
    assert missing == {"stage1_alive_easy", "stage1_alive_medium", "stage1_alive_hard", "stage1_hard_over_easy",
                       "stage2_accuracy_up"}
    assert all(c["value"] is None for c in checks if c["met"] is None)
    assert "| n/a | n/a |" in targets.markdown(checks)
