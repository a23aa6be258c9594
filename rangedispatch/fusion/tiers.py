"""The all-reduce tiers, each one object, in the order their passes run.

A tier is spread over files of its own (its pass, its op, its kernels) and read by code that is not
its own: the tier plan gives it token counts, the config validates its thresholds, rangedispatch-tune
measures it. Each of those reads the tier's ``Tier`` below instead of keeping its own table of tier
names, so adding or removing a tier is one entry here plus its files.

Nothing here imports torch: the config imports this module, and a tier's pass (and with it its op
and kernels; FlashInfer only when asked for) is imported by name when a model builds its passes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from rangedispatch.fusion.tier_plan import TierPass

REFERENCE = "reference"  # the backend every tier has: the process group's collectives (and eager math)


@dataclass(frozen=True)
class Sweep:
    """What rangedispatch-tune times for a tier: bench variants (``rangedispatch/bench/suites.py``)
    and the labels their rows carry in sweep.csv, which ``rangedispatch/tune/crossover.py`` compares."""

    # "op": one all-reduce + residual + RMSNorm; "block": a 2-layer TP block (the tier shows across layers)
    unit: str
    # (bench variant, sweep label) timed on GPUs
    gpu: tuple[tuple[str, str], ...]
    # the same on CPU (no GPU kernels there); None: as on GPUs
    cpu: Optional[tuple[tuple[str, str], ...]] = None

    def variants(self, cuda: bool) -> tuple[tuple[str, str], ...]:
        return self.gpu if cuda or self.cpu is None else self.cpu


@dataclass(frozen=True)
class Tier:
    """One all-reduce tier: where its code is, what config and profile keys it reads, how it is measured."""

    # how logs, the tier plan's key and the bench name it
    name: str
    # its TierPass subclass as "module.Class", imported when a model builds its passes
    pass_class: str
    # the module defining the custom ops its pass puts in graphs
    op: str
    # the kernel backends its op can run, its own first and REFERENCE last (see ``backend_for``)
    backends: tuple[str, ...]
    # the TierThresholds keys (``hardware.thresholds.<world size>.*``) that give its sizes
    thresholds: tuple[str, ...]
    # the FusionConfig switch that turns it off (it runs wherever fusion.enabled does); None: none
    switch: Optional[str]
    # what rangedispatch-tune measures for it
    sweep: Sweep

    def pass_type(self) -> type["TierPass"]:
        module, _, cls = self.pass_class.rpartition(".")
        return getattr(importlib.import_module(module), cls)


# NCCL, timed with the tiers of each sweep unit: (bench variant, sweep label)
NCCL_BASELINES = {"op": ("nccl_compiled_norm", "nccl"), "block": ("fusion_off", "block_nccl")}

FUSED = Tier(
    name="fused",
    pass_class="rangedispatch.fusion.allreduce_rmsnorm_pass.AllReduceRMSNormFusion",
    op="rangedispatch.fusion.allreduce_rmsnorm_op",
    backends=("flashinfer", REFERENCE),
    thresholds=("fused_max_bytes", "oneshot_max_bytes", "fused_max_bytes_by_hidden"),
    switch=None,
    sweep=Sweep("op", gpu=(("fused_oneshot", "oneshot"), ("fused_twoshot", "twoshot")),
                cpu=(("fused_reference", "reference"),)),
)
SYMM_MEM = Tier(
    name="symm_mem",
    pass_class="rangedispatch.fusion.symm_mem_pass.SymmMemAllReduce",
    op="rangedispatch.fusion.symm_mem_op",
    backends=("symm_mem", REFERENCE),
    thresholds=("symm_mem_min_bytes", "symm_mem_max_bytes", "symm_mem_oneshot_max_bytes"),
    switch="symm_mem",
    sweep=Sweep("op", gpu=(("symm_mem_oneshot", "symm_oneshot"), ("symm_mem_twoshot", "symm_twoshot")), cpu=()),
)
SEQUENCE_PARALLEL = Tier(
    name="sequence_parallel",
    pass_class="rangedispatch.fusion.sequence_parallel_pass.SequenceParallel",
    op="rangedispatch.fusion.sequence_parallel_op",
    backends=(REFERENCE,),  # its collectives always run through the process group
    thresholds=("sp_min_bytes", "sp_min_bytes_by_hidden"),
    switch=None,
    sweep=Sweep("block", gpu=(("sequence_parallel", "block_sp"),)),
)
ASYNC_TP = Tier(
    name="async_tp",
    pass_class="rangedispatch.fusion.async_tp_pass.AsyncTensorParallel",
    op="rangedispatch.fusion.async_tp_op",
    backends=("symm_mem", REFERENCE),
    thresholds=("async_tp_min_bytes", "async_tp_min_bytes_by_hidden"),
    switch="async_tp",
    sweep=Sweep("block", gpu=(("async_tp", "block_async_tp"),)),
)

# in the order their passes run: async TP rewrites the ops sequence parallelism puts in the graph
TIERS = (FUSED, SYMM_MEM, SEQUENCE_PARALLEL, ASYNC_TP)


def backend_for(tier: Tier, configured: str) -> str:
    """The backend ``tier``'s op runs: the configured fused backend (``fusion.backend``, or the
    profile's) where the tier has it, so ``reference`` puts every tier on the process group, else
    the tier's own kernel."""
    return configured if configured in tier.backends else tier.backends[0]


def sweep_variants(unit: str, cuda: bool) -> dict[str, str]:
    """Bench variant -> sweep label of what tune times on ``unit``: NCCL and every tier measured there."""
    return dict([NCCL_BASELINES[unit], *(v for t in TIERS if t.sweep.unit == unit for v in t.sweep.variants(cuda))])
