"""The configuration schema: what each key means, its type and default, validated on construction.

The same dataclasses serve both ways in: composed from YAML + overrides by ``load_config`` (the
loader rejects unknown keys), or built in code (``RangeDispatchConfig(dispatch=DispatchConfig(...))``).
Either way ``__post_init__`` checks every value and raises ``ConfigError`` with the full key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, Union

from rangedispatch.config.checks import (
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_str,
    fail,
    is_int,
)
from rangedispatch.fusion.tiers import FUSED, TIERS
from rangedispatch.errors import ConfigError

OUT_OF_RANGE_MODES = ("error", "eager", "compile")
MAX_AUTOTUNE_MODES = ("never", "single_sizes", "always")
SKINNY_GEMM_MODES = ("never", "tuned", "always")
FUSED_BACKENDS = ("auto", *FUSED.backends)


@dataclass
class DispatchConfig:
    """How calls are split into token-count ranges."""

    SECTION: ClassVar[str] = "dispatch"

    # Token counts at which one range ends and the next begins: [8, 32] with max 8192 gives
    # [1,8] [9,32] [33,8192]. Each must be an integer in [1, max_num_tokens - 1]; order and
    # duplicates do not matter. Passes may add split points of their own (fusion adds its threshold).
    split_points: list[int] = field(default_factory=list)
    # Token counts that get a graph of their own, compiled for exactly that size (static shapes,
    # max-autotune by default). Each wins over the range containing it. Integers in [1, max_num_tokens].
    compile_sizes: list[int] = field(default_factory=list)
    # Largest token count the ranges cover; the last range ends here. Integer >= 1.
    max_num_tokens: int = 8192
    # Which input's size is the token count: a position in the forward call's arguments (int >= 0),
    # a parameter name (str), or a list of them: the first that the call passes (not None) counts,
    # e.g. [input_ids, inputs_embeds] for a model called with either.
    token_arg: Union[int, str, list[Union[int, str]]] = 0
    # Which dimension(s) of that input count tokens: "auto", an int, or a list whose product is the
    # token count ([0, 1] for [batch, seq, hidden]). Negative dims count from the end. "auto" decides
    # on the first call: every dim of an integer input (token ids [batch, seq]), every dim but the
    # last of a floating one (activations [tokens, hidden] or [batch, seq, hidden]).
    token_dim: Union[str, int, list[int]] = "auto"
    # A call outside [1, max_num_tokens]: "error" raises, "eager" runs the plain module, "compile"
    # compiles a single-size graph for that count (at most max_extra_sizes of them).
    out_of_range: str = "error"
    # Bound on the single-size graphs out_of_range="compile" may add, so that a stream of odd sizes
    # cannot compile without end. Integer >= 0.
    max_extra_sizes: int = 16
    # Opt-in fast path for serving loops that promise a fixed model: calls skip Dynamo's guards and
    # run Dynamo's transformed forward bound to the range's compiled graph (~10 us less per call on a
    # CPU core). Instead of the guards, every call is checked for: the same positional count and
    # keyword names; per tensor argument the same dtype, device, rank, non-token sizes, requires_grad
    # and contiguity; equal values of None/bool/int/float/str arguments; grad mode; the wrapped
    # module's own `training` flag; the dtype and device of its first parameter. A call that differs
    # takes Dynamo's guarded path. NOT checked: other parameters and buffers, submodules' `training`
    # flags, Python attributes or globals that forward reads, and side effects in forward (replayed
    # as traced). Arguments other than tensors and those scalars (lists, caches, objects) keep the
    # guarded path for every call. false (default): Dynamo's guards check everything.
    skip_dynamo_guards: bool = False
    # Token counts to capture one CUDA graph each for (CUDA inputs only): a call pads up to the next
    # listed size inside its range and gets its outputs sliced back. Integers in [1, max_num_tokens];
    # needs a single token_dim. Call rangedispatch.release_cuda_graphs() before
    # torch.distributed.destroy_process_group(): NCCL cannot destroy a communicator while a graph
    # that captured its collectives exists (destroying it hangs).
    cudagraph_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = self.SECTION
        self.max_num_tokens = check_int(f"{k}.max_num_tokens", self.max_num_tokens, lo=1)
        if isinstance(self.split_points, (list, tuple)) and any(is_int(p) and p >= self.max_num_tokens
                                                                for p in self.split_points):
            raise ConfigError(f"{k}.split_points={list(self.split_points)!r} is not allowed with {k}.max_num_tokens="
                              f"{self.max_num_tokens}: split points lie in [1, {self.max_num_tokens - 1}] (the default "
                              f"config sets some: override them too, e.g. {k}.split_points=[])")
        self.split_points = check_int_list(f"{k}.split_points", self.split_points, 1, self.max_num_tokens - 1)
        self.compile_sizes = check_int_list(f"{k}.compile_sizes", self.compile_sizes, 1, self.max_num_tokens)
        token_args = self.token_arg if isinstance(self.token_arg, (list, tuple)) else [self.token_arg]
        if not token_args or not all((is_int(a) and a >= 0) or (isinstance(a, str) and a.isidentifier())
                                     for a in token_args):
            raise fail(f"{k}.token_arg", self.token_arg,
                       "an argument position (int >= 0), a parameter name (str), or a non-empty list of them")
        if isinstance(self.token_arg, (list, tuple)):
            self.token_arg = list(self.token_arg)
        if self.token_dim != "auto":
            dims = self.token_dim if isinstance(self.token_dim, (list, tuple)) else [self.token_dim]
            if not dims or not all(is_int(d) for d in dims) or len(set(dims)) != len(dims):
                raise fail(f"{k}.token_dim", self.token_dim, "'auto', an int or a non-empty list of distinct ints")
            self.token_dim = list(dims) if isinstance(self.token_dim, (list, tuple)) else self.token_dim
        check_choice(f"{k}.out_of_range", self.out_of_range, OUT_OF_RANGE_MODES)
        check_int(f"{k}.max_extra_sizes", self.max_extra_sizes, lo=0)
        check_bool(f"{k}.skip_dynamo_guards", self.skip_dynamo_guards)
        self.cudagraph_sizes = check_int_list(f"{k}.cudagraph_sizes", self.cudagraph_sizes, 1, self.max_num_tokens)
        if self.cudagraph_sizes and isinstance(self.token_dim, list) and len(self.token_dim) > 1:
            raise fail(f"{k}.token_dim", self.token_dim, f"a single dim when {k}.cudagraph_sizes is set")

    @property
    def token_dims(self) -> Union[str, list[int]]:
        """``"auto"`` or the token dims as a list."""
        if self.token_dim == "auto":
            return "auto"
        return list(self.token_dim) if isinstance(self.token_dim, list) else [self.token_dim]


@dataclass
class CompileConfig:
    """How each range's graph is compiled by Inductor."""

    SECTION: ClassVar[str] = "compile"

    # Which graphs Inductor max-autotunes (torch.compile's "max-autotune-no-cudagraphs" options:
    # GEMM autotuning, and coordinate-descent tuning, which also turns 1-row matmuls into tuned
    # reductions): "never" none, "single_sizes" the static single-size graphs only (tuning pays for a
    # fixed size and costs compile time everywhere), "always" every graph.
    max_autotune: str = "single_sizes"
    # Within max-autotune, also search GEMM kernels (Inductor's Triton templates against cuBLAS).
    # false: cuBLAS stays, only the generated kernels are tuned (coordinate descent). Off by
    # default: on H200 the templates it picked made 32- and 128-token Llama graphs slower than cuBLAS.
    max_autotune_gemm: bool = False
    # In the ranges up to the hardware profile's skinny_gemm_max_tokens (CUDA, bf16/fp16), replace
    # linear layers' matmuls by a Triton skinny GEMM, one launch for those that read one input:
    # "tuned" where timing it against cuBLAS at compile time (both ends of the range, in CUDA graphs)
    # finds it 2% faster, "always" wherever it can run (for testing it; it may be slower), "never"
    # keeps cuBLAS. Tuning adds seconds of compile time per group of weight shapes and range.
    skinny_gemm: str = "tuned"

    def __post_init__(self) -> None:
        check_choice(f"{self.SECTION}.max_autotune", self.max_autotune, MAX_AUTOTUNE_MODES)
        check_bool(f"{self.SECTION}.max_autotune_gemm", self.max_autotune_gemm)
        check_choice(f"{self.SECTION}.skinny_gemm", self.skinny_gemm, SKINNY_GEMM_MODES)


@dataclass
class FusionConfig:
    """The all-reduce -> (+ residual) -> RMSNorm (-> FP8 quant) fusion."""

    SECTION: ClassVar[str] = "fusion"

    # Replace the pattern by one fused op in the ranges where the hardware profile says it pays (and
    # use the profile's symmetric-memory tier above them, see symm_mem). false: NCCL everywhere.
    enabled: bool = True
    # Kernel behind the fused op: "auto" takes the hardware profile's choice and falls back to
    # "reference" (all-reduce through the process group + eager-equal math) where it cannot run.
    # "reference" also makes the symmetric-memory tier reduce through the process group.
    backend: str = "auto"
    # Use the profile's symmetric-memory tier (thresholds symm_mem_*) where it gives one: CUDA,
    # bf16/fp32 all-reduces, sum. Off: those sizes stay with NCCL (and no symmetric buffer is made).
    symm_mem: bool = True
    # Use the profile's async tensor parallelism (threshold async_tp_min_bytes) inside the
    # sequence-parallel tier: CUDA. Off: that tier runs its collectives apart from the matmuls (and
    # no symmetric workspace is made for it).
    async_tp: bool = True

    def __post_init__(self) -> None:
        check_bool(f"{self.SECTION}.enabled", self.enabled)
        check_choice(f"{self.SECTION}.backend", self.backend, FUSED_BACKENDS)
        check_bool(f"{self.SECTION}.symm_mem", self.symm_mem)
        check_bool(f"{self.SECTION}.async_tp", self.async_tp)


@dataclass
class TierThresholds:
    """Where each all-reduce tier pays, in bytes of one rank's all-reduce input (tokens x hidden x
    dtype size), for one world size."""

    # Fuse all-reduce + residual + RMSNorm (+ quant) up to this size; 0 never fuses.
    fused_max_bytes: int = 0
    # Within the fused sizes, the one-shot kernel up to this size and two-shot above it.
    oneshot_max_bytes: int = 0
    # Where the crossover was measured per hidden size (keys: hidden size as a string), it replaces
    # fused_max_bytes for all-reduces of that hidden size: the byte threshold moves with the hidden
    # size (smaller rows pay less per byte). Hidden sizes not listed use fused_max_bytes.
    fused_max_bytes_by_hidden: dict[str, int] = field(default_factory=dict)
    # The symmetric-memory tier (torch symm-mem all-reduce, then the compiled norm) for all-reduces
    # the fused tier leaves: from symm_mem_min_bytes up to symm_mem_max_bytes; NCCL beyond. Its
    # buffer (symm_mem_max_bytes per rank and group) is allocated on first use. 0 max: no tier.
    symm_mem_min_bytes: int = 0
    symm_mem_max_bytes: int = 0
    # Within that tier, the one-shot kernel up to this size and two-shot above it.
    symm_mem_oneshot_max_bytes: int = 0
    # The sequence-parallel tier, from this size up (above the fused and symmetric-memory sizes):
    # each all-reduce -> (+ residual) -> RMSNorm becomes a reduce-scatter, the add and norm on this
    # rank's block of tokens, and an all-gather of the norm's output; the residual stream between
    # such sites stays split over the ranks. 0: no tier. rangedispatch-tune measures where it starts
    # paying on a 2-layer TP block.
    sp_min_bytes: int = 0
    # Where measured per hidden size (keys: hidden size as a string), it replaces sp_min_bytes for
    # all-reduces of that hidden size (0 there: no tier at that hidden size).
    sp_min_bytes_by_hidden: dict[str, int] = field(default_factory=dict)
    # Async tensor parallelism on top of the sequence-parallel tier, from this size up (and where
    # that tier is on): its all-gathers and reduce-scatters run overlapped with the matmuls next to
    # them (torch symm-mem fused_all_gather_matmul / fused_matmul_reduce_scatter). 0: never. Its
    # workspace holds one rank's block of dispatch.max_num_tokens rows, twice, per group.
    async_tp_min_bytes: int = 0
    # Where measured per hidden size (keys: hidden size as a string), it replaces async_tp_min_bytes
    # for all-reduces of that hidden size (0 there: never): one start for all hidden sizes would
    # leave plain sequence parallelism, which may lose to NCCL, where async TP already pays.
    async_tp_min_bytes_by_hidden: dict[str, int] = field(default_factory=dict)

    def fused_max_bytes_for(self, hidden: int) -> int:
        return self.fused_max_bytes_by_hidden.get(str(hidden), self.fused_max_bytes)

    def sp_min_bytes_for(self, hidden: int) -> int:
        return self.sp_min_bytes_by_hidden.get(str(hidden), self.sp_min_bytes)

    def async_tp_min_bytes_for(self, hidden: int) -> int:
        return self.async_tp_min_bytes_by_hidden.get(str(hidden), self.async_tp_min_bytes)


_NO_TIERS = TierThresholds()  # every key at its default: a mapping marks one given per hidden size


@dataclass
class HardwareConfig:
    """A hardware profile (conf/hardware/NAME.yaml): measured thresholds for one kind of machine."""

    SECTION: ClassVar[str] = "hardware"

    # Profile name (the file name without .yaml).
    name: str = "cpu"
    # Kernel the fused op uses on this hardware: "reference" or "flashinfer".
    fused_backend: str = "reference"
    # The device the profile was measured on (CUDA device name, or "cpu"), written by
    # rangedispatch-tune: hardware=auto prefers a user profile measured on this device. Empty: none.
    device_name: str = ""
    # Thresholds per world size: keys are world sizes as strings ("2", "4", "8") or "default" for
    # any world size not listed.
    thresholds: dict[str, TierThresholds] = field(default_factory=lambda: {"default": TierThresholds()})
    # Token counts measured to run faster on this hardware as graphs of their own (1: one sequence
    # decoding, where coordinate-descent tuning turns each 1-row matmul into a tuned reduction).
    # Added to dispatch.compile_sizes; those above dispatch.max_num_tokens are not used.
    compile_sizes: list[int] = field(default_factory=list)
    # The same for the token counts in dispatch.cudagraph_sizes, measured with CUDA graphs: the
    # host's launch costs are gone there, so another graph may win. It decides only for those counts
    # (compile_sizes decides for the others); [] gives them no graph of their own, null (the
    # default) takes compile_sizes for them too.
    compile_sizes_with_cudagraphs: Optional[list[int]] = None
    # The decode ranges: ranges ending at or below this many tokens get the skinny-GEMM pass
    # (compile.skinny_gemm); this count and each power of two from 16 below it (16, 32, 64, ...)
    # become split points. 0: no such ranges.
    skinny_gemm_max_tokens: int = 0

    def __post_init__(self) -> None:
        k = self.SECTION
        check_str(f"{k}.name", self.name)
        check_int(f"{k}.skinny_gemm_max_tokens", self.skinny_gemm_max_tokens, lo=0)
        if not isinstance(self.device_name, str):
            raise fail(f"{k}.device_name", self.device_name, "a device name (str)")
        check_choice(f"{k}.fused_backend", self.fused_backend, FUSED_BACKENDS[1:])
        if not isinstance(self.thresholds, dict) or not self.thresholds:
            raise fail(f"{k}.thresholds", self.thresholds, "a mapping of world size (or 'default') to thresholds")
        normalized = {}
        for ws, t in self.thresholds.items():
            ws = str(ws)
            if ws != "default" and not (ws.isdigit() and int(ws) >= 1):
                raise fail(f"{k}.thresholds.{ws}", ws, "a world size (integer >= 1) or 'default' as key")
            if isinstance(t, dict):
                t = TierThresholds(**t)
            if not isinstance(t, TierThresholds):
                raise fail(f"{k}.thresholds.{ws}", t,
                           f"a mapping with {', '.join(f.name for f in fields(TierThresholds))}")
            for name in (name for tier in TIERS for name in tier.thresholds):  # bytes, or bytes by hidden size
                if isinstance(getattr(_NO_TIERS, name), dict):
                    setattr(t, name, _bytes_by_hidden(f"{k}.thresholds.{ws}.{name}", getattr(t, name)))
                else:
                    check_int(f"{k}.thresholds.{ws}.{name}", getattr(t, name), lo=0)
            if t.symm_mem_max_bytes and t.symm_mem_min_bytes > t.symm_mem_max_bytes:
                raise fail(f"{k}.thresholds.{ws}.symm_mem_min_bytes", t.symm_mem_min_bytes,
                           f"at most symm_mem_max_bytes ({t.symm_mem_max_bytes})")
            normalized[ws] = t
        self.thresholds = normalized
        self.compile_sizes = check_int_list(f"{k}.compile_sizes", self.compile_sizes, lo=1)
        if self.compile_sizes_with_cudagraphs is not None:
            if not isinstance(self.compile_sizes_with_cudagraphs, (list, tuple)):
                raise fail(f"{k}.compile_sizes_with_cudagraphs", self.compile_sizes_with_cudagraphs,
                           "null or a list of integers >= 1")
            self.compile_sizes_with_cudagraphs = check_int_list(
                f"{k}.compile_sizes_with_cudagraphs", self.compile_sizes_with_cudagraphs, lo=1)

    def thresholds_for(self, world_size: int) -> TierThresholds:
        """The thresholds for ``world_size``; a profile without that size nor a default never fuses."""
        return self.thresholds.get(str(world_size)) or self.thresholds.get("default") or TierThresholds()


def _bytes_by_hidden(key: str, mapping: object) -> dict[str, int]:
    """A ``{hidden size: bytes}`` mapping with string keys."""
    if not isinstance(mapping, dict):
        raise fail(key, mapping, "a mapping of hidden size to bytes")
    out = {}
    for hidden, limit in mapping.items():
        if not str(hidden).isdigit():
            raise fail(f"{key}.{hidden}", hidden, "a hidden size (integer) as key")
        out[str(hidden)] = check_int(f"{key}.{hidden}", limit, lo=0)
    return out


@dataclass
class RangeDispatchConfig:
    """Everything RangeCompiledModule reads."""

    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def __post_init__(self) -> None:
        for name, cls in (("dispatch", DispatchConfig), ("compile", CompileConfig),
                          ("fusion", FusionConfig), ("hardware", HardwareConfig)):
            if not isinstance(getattr(self, name), cls):
                raise fail(name, getattr(self, name), f"a {cls.__name__}")

    @property
    def skinny_gemm_tokens(self) -> int:
        """The decode ranges the skinny GEMM runs in end at or below this; 0: it runs nowhere
        (compile.skinny_gemm=never, or no limit in the hardware profile)."""
        return 0 if self.compile.skinny_gemm == "never" else self.hardware.skinny_gemm_max_tokens

    @property
    def compile_sizes(self) -> list[int]:
        """The single-size graphs: dispatch.compile_sizes and the hardware profile's (up to
        max_num_tokens), the profile's CUDA-graph list for the sizes in dispatch.cudagraph_sizes."""
        h, d = self.hardware, self.dispatch
        with_graphs = h.compile_sizes if h.compile_sizes_with_cudagraphs is None else h.compile_sizes_with_cudagraphs
        profile = [n for n in h.compile_sizes if n not in d.cudagraph_sizes]
        profile += [n for n in with_graphs if n in d.cudagraph_sizes]
        return sorted({*d.compile_sizes, *(n for n in profile if n <= d.max_num_tokens)})
