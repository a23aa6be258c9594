"""The tier registry is the one place a tier is named: its pass and op import from it (FlashInfer's
backend not among them), its thresholds are exactly the profile's keys, and the passes a config
builds run the backends the config asks for."""

import dataclasses
import importlib
import sys

import pytest

from rangedispatch.config.schema import FusionConfig, RangeDispatchConfig, TierThresholds
from rangedispatch.fusion import build_fusion_passes
from rangedispatch.fusion.tiers import TIERS


def test_each_tier_names_its_pass_and_op_without_importing_flashinfer():
    for tier in TIERS:
        assert tier.pass_type().tier is tier
        importlib.import_module(tier.op)
    assert "flashinfer" not in sys.modules


def test_the_tiers_read_every_threshold_once():
    keys = [k for tier in TIERS for k in tier.thresholds]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(TierThresholds))


@pytest.mark.parametrize("fusion, expected", [
    (FusionConfig(backend="flashinfer"), {"allreduce_rmsnorm": "flashinfer", "symm_mem_allreduce": "symm_mem",
                                          "sequence_parallel": "reference", "async_tp": "symm_mem"}),
    (FusionConfig(backend="reference"), {"allreduce_rmsnorm": "reference", "symm_mem_allreduce": "reference",
                                         "sequence_parallel": "reference", "async_tp": "reference"}),
    (FusionConfig(symm_mem=False, async_tp=False), {"allreduce_rmsnorm": "reference", "sequence_parallel": "reference"}),
])
def test_the_passes_a_config_builds_and_their_backends(fusion, expected):
    passes = build_fusion_passes(RangeDispatchConfig(fusion=fusion))
    assert {p.name: p.backend for p in passes} == expected
    assert len({id(p.plan) for p in passes}) == 1
