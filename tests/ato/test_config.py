"""ATO's options: one dataclass holds every default; an unknown option names the nearest valid one."""

from __future__ import annotations

from dataclasses import fields

import pytest

import atofx
from atofx.app.options import TrainJob
from atofx.ato.config import ATOConfig, check_options


@pytest.mark.parametrize("flavour", ["atofx", "official"])
def test_a_mistyped_option_names_the_nearest_valid_one(flavour):
    with pytest.raises(atofx.ConfigError, match="unknown option 'lamm'; did you mean 'lam'"):
        ATOConfig.of(flavour, lamm=3.0)


def test_another_librarys_option_names_what_atofx_offers_instead():
    with pytest.raises(atofx.ConfigError, match="target_flops is the share of FLOPs kept"):
        check_options(["pruning_ratio"])


def test_options_and_the_flavour_are_accepted():
    check_options(["lam", "freeze_mask", "flavour"])
    assert ATOConfig.of("official", lam=3.0).lam == 3.0


def test_the_train_job_takes_atos_defaults_from_the_dataclass():
    job, config = TrainJob(), ATOConfig()
    shared = {f.name for f in fields(TrainJob)} & {f.name for f in fields(ATOConfig)}
    assert {"target_flops", "method", "projection", "round_to", "seed"} <= shared
    for name in shared:
        default = getattr(job, name)
        assert default is None or default == getattr(config, name), name  # None: the flavour decides
