"""What ``rangedispatch-bench`` measures (the ``bench:`` section of conf/bench.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rangedispatch.bench.hf_models import ATTENTIONS, TP_STYLES
from rangedispatch.config.checks import check_choice, check_int, check_int_list, check_str, fail

LEVELS = ("op", "model", "hf", "generate")
GENERATE_VARIANTS = ("eager", "hf_compiled_static", "torch_compile", "rangedispatch")
# bench.smoke: shapes a CPU runs in about a minute per level
SMOKE = dict(op_hidden=[256], op_tokens=[1, 8, 64], fp8=[False], model_shapes=[[256, 1024]],
             model_tokens=[1, 8, 64, 256], hf_shapes=[[256, 512]], hf_tokens=[1, 8, 64], calls_per_graph=2, replays=3,
             generate_shapes=[[256, 512, 2]], generate_batch=[1], generate_prompt=16, generate_new_tokens=6,
             generate_repeats=1)


@dataclass
class BenchConfig:
    SECTION = "bench"

    # Which sweeps to run: "op" (all-reduce + residual + RMSNorm per kernel tier), "model" (a TP
    # block through each compile variant), "hf" (a HF Llama-shaped decoder under TP; needs transformers),
    # "generate" (HF generate end to end: time to first token, per output token, tokens/s).
    levels: list[str] = field(default_factory=lambda: ["op", "model"])
    # Ranks to spawn when not started by torchrun (one GPU each). Integer >= 1; the op, model and hf
    # levels need 2 or more.
    world_size: int = 2
    # Op level: hidden sizes and token counts.
    op_hidden: list[int] = field(default_factory=lambda: [8192])
    op_tokens: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 512, 2048, 4096])
    # Op level: run without FP8 quant, with it, or both.
    fp8: list[bool] = field(default_factory=lambda: [False, True])
    # Model level: [hidden, intermediate] pairs; the intermediate dim is split over the ranks.
    model_shapes: list[list[int]] = field(default_factory=lambda: [[8192, 28672], [2048, 8192]])
    # Model level: layers of the block, and token counts (the largest sets dispatch.max_num_tokens).
    model_layers: int = 2
    model_tokens: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384])
    # HF level: [hidden, intermediate] pairs of a Llama-shaped decoder (heads of 128, 8 KV heads),
    # the tensor-parallel styles (handwritten, dtensor, dtensor_output) and token counts (batch 1).
    hf_shapes: list[list[int]] = field(default_factory=lambda: [[4096, 14336], [8192, 28672]])
    hf_tp: list[str] = field(default_factory=lambda: ["handwritten", "dtensor"])
    hf_tokens: list[int] = field(default_factory=lambda: [1, 32, 128, 512, 2048, 8192])
    # HF level: the attention (rangedispatch/bench/hf_models.py). "hf_default": as the installed
    # transformers picks it (SDPA for Llama; on torch 2.11 or transformers 5.17, under torch.compile,
    # with a causal mask tensor, so no flash kernel); "sdpa_is_causal": SDPA with is_causal=True and
    # no mask tensor, as transformers 5.24 on torch 2.13 runs it. Level names get the suffix
    # "_sdpa_is_causal".
    hf_attention: str = "hf_default"
    # Model and HF levels: when set, range dispatch is also timed with these token counts as graphs
    # of their own (dispatch.compile_sizes, autotuned as compile.max_autotune says), as the variant
    # range_dispatch_sizes. Range-dispatch rows record their range's compile seconds either way.
    compile_sizes: list[int] = field(default_factory=list)
    # Generate level: [hidden, intermediate, layers] of a LlamaForCausalLM (heads of 128, 8 KV heads,
    # vocabulary 32000); the default is Llama-3-8B's shape.
    generate_shapes: list[list[int]] = field(default_factory=lambda: [[4096, 14336, 32]])
    # Generate level: batch sizes, prompt length and new tokens per generate (greedy).
    generate_batch: list[int] = field(default_factory=lambda: [1, 8])
    generate_prompt: int = 512
    generate_new_tokens: int = 256
    # Generate level: timed generates per measurement (the median is reported), after one untimed.
    generate_repeats: int = 3
    # Generate level: variants besides eager (always run: the others' tokens are compared with it):
    # hf_compiled_static, torch_compile, rangedispatch (rangedispatch/bench/generate.py).
    generate_variants: list[str] = field(default_factory=lambda: ["hf_compiled_static", "torch_compile",
                                                                    "rangedispatch"])
    # Generate level: the HBM bandwidth in TB/s for the per-token floor (weights per rank / bandwidth):
    # 4.8 for an H200, 3.35 for an H100 SXM.
    hbm_tb_s: float = 4.8
    # Timing: calls captured per CUDA graph, and graph replays (the median is reported).
    calls_per_graph: int = 10
    replays: int = 20
    # Where table.md, results.csv and results.png go.
    out_dir: str = "bench-results"
    # A CPU smoke run: the ranks see no GPU and use gloo and the reference backend, with SMOKE's
    # small shapes and few replays (the shape, token, fp8 and timing keys above are not used). It
    # checks that the tool and its outputs work on any machine; its times say nothing of GPUs.
    smoke: bool = False

    def __post_init__(self) -> None:
        k = self.SECTION
        if not isinstance(self.levels, list) or not self.levels:
            raise fail(f"{k}.levels", self.levels, "a non-empty list of " + ", ".join(LEVELS))
        for level in self.levels:
            check_choice(f"{k}.levels", level, LEVELS)
        check_int(f"{k}.world_size", self.world_size, lo=1)
        if self.world_size < 2 and set(self.levels) - {"generate"}:
            raise fail(f"{k}.world_size", self.world_size, "2 or more for the op, model and hf levels")
        for shape in self.generate_shapes:
            if not (isinstance(shape, list) and len(shape) == 3):
                raise fail(f"{k}.generate_shapes", self.generate_shapes, "a list of [hidden, intermediate, layers]")
            check_int_list(f"{k}.generate_shapes", shape, lo=1)
        self.generate_batch = check_int_list(f"{k}.generate_batch", self.generate_batch, lo=1)
        check_int(f"{k}.generate_prompt", self.generate_prompt, lo=1)
        check_int(f"{k}.generate_new_tokens", self.generate_new_tokens, lo=2)
        check_int(f"{k}.generate_repeats", self.generate_repeats, lo=1)
        for variant in self.generate_variants:
            check_choice(f"{k}.generate_variants", variant, GENERATE_VARIANTS)
        if not isinstance(self.hbm_tb_s, (int, float)) or isinstance(self.hbm_tb_s, bool) or self.hbm_tb_s <= 0:
            raise fail(f"{k}.hbm_tb_s", self.hbm_tb_s, "a number > 0 (TB/s)")
        self.op_hidden = check_int_list(f"{k}.op_hidden", self.op_hidden, lo=1)
        self.op_tokens = check_int_list(f"{k}.op_tokens", self.op_tokens, lo=1)
        if not isinstance(self.fp8, list) or not all(isinstance(v, bool) for v in self.fp8) or not self.fp8:
            raise fail(f"{k}.fp8", self.fp8, "a non-empty list of true/false")
        for shape in self.model_shapes:
            if not (isinstance(shape, list) and len(shape) == 2):
                raise fail(f"{k}.model_shapes", self.model_shapes, "a list of [hidden, intermediate] pairs")
            check_int_list(f"{k}.model_shapes", shape, lo=1)
        check_int(f"{k}.model_layers", self.model_layers, lo=1)
        for shape in self.hf_shapes:
            if not (isinstance(shape, list) and len(shape) == 2):
                raise fail(f"{k}.hf_shapes", self.hf_shapes, "a list of [hidden, intermediate] pairs")
            check_int_list(f"{k}.hf_shapes", shape, lo=1)
        for style in self.hf_tp:
            check_choice(f"{k}.hf_tp", style, TP_STYLES)
        check_choice(f"{k}.hf_attention", self.hf_attention, ATTENTIONS)
        self.hf_tokens = check_int_list(f"{k}.hf_tokens", self.hf_tokens, lo=1)
        self.model_tokens = check_int_list(f"{k}.model_tokens", self.model_tokens, lo=1)
        self.compile_sizes = check_int_list(f"{k}.compile_sizes", self.compile_sizes, lo=1)
        check_int(f"{k}.calls_per_graph", self.calls_per_graph, lo=1)
        check_int(f"{k}.replays", self.replays, lo=1)
        check_str(f"{k}.out_dir", self.out_dir)
        if not isinstance(self.smoke, bool):
            raise fail(f"{k}.smoke", self.smoke, "true or false")

    def as_run(self) -> "BenchConfig":
        """What runs: this config, with SMOKE's shapes and timing if ``smoke``."""
        return dataclasses.replace(self, **SMOKE) if self.smoke else self
