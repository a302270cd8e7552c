"""The demo_assets fixture (conftest.DemoAssets): the tokenizer and tiny models, built once per session
by the real rules, are up to date in every workflow folder they are seeded into, and a seeded folder
still rebuilds an asset whose settings change, as if it had built them itself.

Slow: builds the workflow tests' assets when no earlier module of the session did.
"""

from __future__ import annotations

import re

import pytest

from test_workflow_dry import jobs_planned

from conftest import WORKFLOW_ASSETS, run_snakemake, small_config, write_config

pytestmark = pytest.mark.slow


def test_seeded_assets_are_up_to_date_and_a_changed_asset_setting_rebuilds_it(demo_assets, tmp_path):
    cfg = small_config(tmp_path, **WORKFLOW_ASSETS)
    write_config(tmp_path, cfg)
    demo_assets.seed(tmp_path, cfg)
    out = run_snakemake(tmp_path, "-n").stdout
    planned = jobs_planned(out)
    assert planned["generate_shard"] == 4
    assert "build_tokenizer" not in planned and "build_model" not in planned
    assert not re.search(r"output: \S*/data/chat_(en|zh)/reformatted/", out)  # the corpora came along
    assert "missing provenance/metadata" not in out

    cfg["assets"]["models"]["tiny-llama-b"]["steps"] += 1
    write_config(tmp_path, cfg)
    out = run_snakemake(tmp_path, "-n").stdout
    assert jobs_planned(out)["build_model"] == 1 and "Params have changed since last execution" in out
