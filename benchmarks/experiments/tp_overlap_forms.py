"""Large-range TP collectives: which way of overlapping them with the matmuls pays, and how much there
is to win at all.

Two layers of a Llama MLP (gate and up projections, SiLU, down projection, all-reduce, residual add,
RMSNorm; bf16, one rank's 1/world of the intermediate size), timed in CUDA graphs on every rank, in
these forms:

- ``matmuls_only``: the matmuls and the SiLU, no communication (the floor);
- ``nccl``: NCCL all-reduce after the down projection (what torch.compile runs);
- ``nccl_fused_norm``: the same all-reduce, then the residual add and the norm in one kernel (the one
  ``matmul_push_all_reduce`` ends with), as torch.compile fuses them;
- ``nccl_sequence_parallel``: NCCL reduce-scatter, the add and norm on this rank's tokens, NCCL
  all-gather before the next gate/up;
- ``torch_symm_mem``: PyTorch's ``fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter``
  (one matmul per rank's block, the blocks moved by the copy engines; what the async-TP tier runs);
- ``two_stage``: the same data movement in two matmuls per op instead of one per rank: the own block
  while a side stream pulls the others, then the other blocks (at most two contiguous runs);
- ``micro_batch_nccl``: the tokens in two halves, each half's NCCL all-reduce under the other half's
  matmuls (whole matmuls, half the rows; NCCL's kernels take SMs from them);
- ``micro_batch_copy_engine``: the same pipeline with each half's all-reduce moved by the copy
  engines over symmetric memory (a pull of this rank's block of the peers' partial sums, an add, a
  pull of the peers' sums), so that only the add and the barriers take SMs;
- ``micro_batch_*_high_priority``: the same, the collectives on a high-priority stream, whose
  kernels (NCCL's, or the add and the barriers) get the next free SMs ahead of the matmuls' waiting
  blocks;
- ``micro_batch_nccl_ctas_N_high_priority``: the same on an NCCL group capped at N CTAs per
  collective (``ncclConfig_t.maxCTAs``): a slower all-reduce that leaves more SMs to the matmul it
  runs under;
- ``matmul_push_all_reduce``: the down projection as a Triton GEMM whose epilogue stores each
  output tile into every rank's symmetric buffer, then a barrier and one kernel that sums the ranks'
  slots, adds the residual and normalizes (``matmul_push_allreduce.py``); ``triton_matmul_nccl`` is
  the same GEMM into a local tensor followed by ``nccl``'s all-reduce, the GEMM's own cost;
- ``matmul_push_sequence_parallel``: the same GEMM storing each tile only in the buffer of the rank
  that owns its rows (a reduce-scatter), the sum, add and norm on those rows, and the norm's output
  stored into every rank's buffer (an all-gather) for the next gate/up; token counts multiples of
  256 x WORLD;
- ``column_chunks_C_*_high_priority``: the down projection in C column chunks, each chunk's
  all-reduce (NCCL, NCCL capped at N CTAs, or the copy engines) under the next chunk's matmul; only
  the last chunk's is exposed, and the matmuls keep all their rows.

FORM names the forms to time (all by default); ``nccl``, the reference, always runs. Every form's
output is checked against ``nccl``'s. Token counts must be multiples of 2 x WORLD (the
halves are split into rank blocks). Results: ``benchmarks/results/h200x4.md`` (TP=4) and
``h200x2.md`` (TP=2).

    python benchmarks/experiments/tp_overlap_forms.py WORLD TOKENS[,TOKENS...] OUT.json [FORM,...]    # WORLD CUDA GPUs
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from matmul_push_allreduce import MatmulPushAllReduce, MatmulPushSequenceParallel, sum_add_rms_norm, triton_matmul
from rangedispatch.bench.timing import time_us
from rangedispatch.cli.launch import spawn_ranks

HIDDEN, INTERMEDIATE, LAYERS = 8192, 28672, 2
COLUMN_CHUNKS = (2, 4)
NCCL_CTAS = (4, 8, 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-6)


class TwoStage:
    """All-gather + matmul and matmul + reduce-scatter in two stages over the symmetric workspace."""

    def __init__(self, group_name: str, rank: int, world: int, tokens: int):
        from torch.distributed._symmetric_memory import get_symm_mem_workspace

        self.rank, self.world, self.block = rank, world, tokens // world
        # as large as the torch_symm_mem form asks (two blocks), so that neither reallocates it
        self.workspace = get_symm_mem_workspace(group_name, min_size=max(2, world - 1) * self.block * HIDDEN * 2)
        self.side = torch.cuda.Stream()
        self.own = slice(rank * self.block, (rank + 1) * self.block)
        self.others = [s for s in (slice(0, rank * self.block), slice((rank + 1) * self.block, tokens))
                       if s.start < s.stop]

    def _pull(self, copies):
        """Run ``copies`` on the side stream, after what the current stream queued so far."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for dst, src in copies:
                dst.copy_(src)

    def all_gather_matmul(self, shard: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        ws, block = self.workspace, self.block
        ws.get_buffer(self.rank, shard.shape, shard.dtype, 0).copy_(shard)
        ws.barrier(channel=0)
        full = shard.new_empty((self.world * block, shard.shape[1]))
        products = [shard.new_empty((full.shape[0], w.shape[1])) for w in weights]
        self._pull([(full[p * block:(p + 1) * block], ws.get_buffer(p, shard.shape, shard.dtype, 0))
                    for p in range(self.world) if p != self.rank])
        for w, out in zip(weights, products):
            torch.mm(shard, w, out=out[self.own])
        torch.cuda.current_stream().wait_stream(self.side)
        for rows in self.others:
            for w, out in zip(weights, products):
                torch.mm(full[rows], w, out=out[rows])
        ws.barrier(channel=1)
        return products

    def matmul_reduce_scatter(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ws, block, n = self.workspace, self.block, w.shape[1]
        shape = ((self.world - 1) * block, n)  # the other ranks' blocks, without this rank's
        partials = ws.get_buffer(self.rank, shape, a.dtype, 0)
        for rows in self.others:
            start = rows.start if rows.start == 0 else rows.start - block
            torch.mm(a[rows], w, out=partials[start:start + rows.stop - rows.start])
        ws.barrier(channel=0)
        received = a.new_empty((self.world, block, n))
        at = [(self.rank if self.rank < p else self.rank - 1) * block for p in range(self.world)]
        self._pull([(received[p], ws.get_buffer(p, shape, a.dtype, 0)[at[p]:at[p] + block])
                    for p in range(self.world) if p != self.rank])
        torch.mm(a[self.own], w, out=received[self.rank])
        torch.cuda.current_stream().wait_stream(self.side)
        out = received.sum(0)
        ws.barrier(channel=1)
        return out


class CopyEngineAllReduce:
    """All-reduce of one micro-batch on a side stream, its data moved by the copy engines.

    The down projection writes its partial sums into this rank's symmetric buffer. Each rank pulls
    its row block of every peer's partial sums, adds them into a second symmetric buffer, and pulls
    the peers' reduced blocks from there. The last barrier keeps a rank from overwriting either
    buffer while a peer still reads it. The add and the barriers are kernels: on a side stream of
    default priority they wait for the SMs that the matmuls hold."""

    def __init__(self, group_name: str, rank: int, world: int, max_rows: int, cols: int = HIDDEN,
                 side: torch.cuda.Stream | None = None):
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.world, self.cols = rank, world, cols
        self.buffers = [symm_mem.empty(max_rows * cols, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        self.partial, self.reduced = (symm_mem.rendezvous(b, group_name) for b in self.buffers)
        self.side = side or torch.cuda.Stream()

    def partial_out(self, rows: int) -> torch.Tensor:
        """Where the down projection writes this rank's partial sums of ``rows`` tokens."""
        return self.buffers[0][:rows * self.cols].view(rows, self.cols)

    def start(self, rows: int) -> None:
        """Queue the all-reduce of ``partial_out(rows)`` behind what the current stream queued."""
        block, shape = rows // self.world, (rows, self.cols)
        self.out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.partial.barrier(channel=0)
            mine = slice(self.rank * block, (self.rank + 1) * block)
            staged = torch.empty((self.world, block, self.cols), device="cuda", dtype=torch.bfloat16)
            for p in range(self.world):
                staged[p].copy_(self.partial.get_buffer(p, shape, torch.bfloat16, 0)[mine])
            torch.sum(staged, 0, out=self.buffers[1][:rows * self.cols].view(shape)[mine])
            self.reduced.barrier(channel=0)
            for p in range(self.world):
                theirs = slice(p * block, (p + 1) * block)
                self.out[theirs].copy_(self.reduced.get_buffer(p, shape, torch.bfloat16, 0)[theirs])
            self.reduced.barrier(channel=1)

    def finish(self) -> torch.Tensor:
        torch.cuda.current_stream().wait_stream(self.side)
        return self.out


def _high_priority_nccl_group(max_ctas: int | None = None) -> dist.ProcessGroup:
    """Another NCCL group whose kernels run on a high-priority stream, at most ``max_ctas`` CTAs per
    collective if given (all ranks call this)."""
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    if max_ctas is not None:
        options.config.min_ctas = 1
        options.config.max_ctas = max_ctas
    return dist.new_group(backend="nccl", pg_options=options)


def _rank(rank: int, world: int, token_counts: list[int], only: list[str]) -> list[dict]:
    group_name = dist.group.WORLD.group_name
    symm_mem = torch.ops.symm_mem
    inter = INTERMEDIATE // world
    cuda_bf16 = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    gate, up = (torch.randn(HIDDEN, inter, **cuda_bf16) / HIDDEN ** 0.5 for _ in range(2))
    down = torch.randn(inter, HIDDEN, **cuda_bf16) / inter ** 0.5
    norm_weight = torch.ones(HIDDEN, **cuda_bf16)
    max_tokens = max(token_counts)
    high = torch.cuda.Stream(priority=-1)
    copy_engine = {prio: [CopyEngineAllReduce(group_name, rank, world, max_tokens // 2, side=side) for _ in range(2)]
                   for prio, side in (("default", None), ("high", high))}
    column_copy_engine = {c: [CopyEngineAllReduce(group_name, rank, world, max_tokens, HIDDEN // c, side=high)
                              for _ in range(c)] for c in COLUMN_CHUNKS}
    high_priority_group = _high_priority_nccl_group()
    capped_groups = {n: _high_priority_nccl_group(n) for n in NCCL_CTAS}
    push = MatmulPushAllReduce(group_name, rank, world, max_tokens, HIDDEN)
    push_sp = MatmulPushSequenceParallel(group_name, rank, world, max_tokens, HIDDEN)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, HIDDEN, **cuda_bf16)
        own = slice(rank * tokens // world, (rank + 1) * tokens // world)
        two_stage = TwoStage(group_name, rank, world, tokens)

        def matmuls_only():
            h = x
            for _ in range(LAYERS):
                h = (F.silu(h @ gate) * (h @ up)) @ down
            return h

        def eager_add_norm(y, residual):
            residual = y + residual
            return rms_norm(residual, norm_weight), residual

        def fused_add_norm(y, residual):
            return sum_add_rms_norm(y[None], residual, norm_weight)

        def nccl(matmul=torch.mm, add_norm=eager_add_norm):
            h = residual = x
            for _ in range(LAYERS):
                y = matmul(F.silu(h @ gate) * (h @ up), down)
                dist.all_reduce(y)
                h, residual = add_norm(y, residual)
            return h[own]

        def nccl_sequence_parallel():
            h = residual = x[own]
            for _ in range(LAYERS):
                full = h.new_empty((tokens, HIDDEN))
                dist.all_gather_into_tensor(full, h.contiguous())
                y = (F.silu(full @ gate) * (full @ up)) @ down
                block = h.new_empty(h.shape)
                dist.reduce_scatter_tensor(block, y)
                residual = block + residual
                h = rms_norm(residual, norm_weight)
            return h

        def torch_symm_mem():
            h = residual = x[own].contiguous()
            for _ in range(LAYERS):
                _, (g, u) = symm_mem.fused_all_gather_matmul(h, [gate, up], 0, group_name, return_A=True)
                residual = symm_mem.fused_matmul_reduce_scatter(F.silu(g) * u, down, "sum", 0, group_name) + residual
                h = rms_norm(residual, norm_weight)
            return h

        def two_stage_form():
            h = residual = x[own].contiguous()
            for _ in range(LAYERS):
                g, u = two_stage.all_gather_matmul(h, [gate, up])
                residual = two_stage.matmul_reduce_scatter(F.silu(g) * u, down) + residual
                h = rms_norm(residual, norm_weight)
            return h

        def matmul_push_all_reduce():
            h = residual = x
            for layer in range(LAYERS):
                h, residual = push(F.silu(h @ gate) * (h @ up), down, residual, norm_weight, layer % 2)
            return h[own]

        def matmul_push_sequence_parallel():
            h, residual = x, x[own].contiguous()
            for _ in range(LAYERS):
                h, residual = push_sp(F.silu(h @ gate) * (h @ up), down, residual, norm_weight)
            return h[own]

        def micro_batch(start, finish):
            """Two halves of the tokens; each half's all-reduce runs under the other half's matmuls."""
            halves = [slice(0, tokens // 2), slice(tokens // 2, tokens)]
            h = [x[s] for s in halves]
            residual = list(h)
            for layer in range(LAYERS + 1):
                for i in range(2):
                    if layer:
                        residual[i] = finish(i) + residual[i]
                        h[i] = rms_norm(residual[i], norm_weight)
                    if layer < LAYERS:
                        start(i, F.silu(h[i] @ gate) * (h[i] @ up))
            return torch.cat(h)[own]

        def column_chunks(chunks, start, finish):
            """The down projection in column chunks; each chunk's all-reduce under the next chunk's matmul."""
            h = residual = x
            width = HIDDEN // chunks
            for _ in range(LAYERS):
                act = F.silu(h @ gate) * (h @ up)
                for j in range(chunks):
                    start(j, act, down[:, j * width:(j + 1) * width])
                residual = torch.cat([finish(j) for j in range(chunks)], dim=1) + residual
                h = rms_norm(residual, norm_weight)
            return h[own]

        pending = {}

        def nccl_start(i, act, weight=down, group=None):
            y = act @ weight
            pending[i] = (y, dist.all_reduce(y, group=group, async_op=True))

        def nccl_finish(i):
            y, work = pending[i]
            work.wait()
            return y

        def copy_engine_start(engines, i, act, weight=down):
            torch.mm(act, weight, out=engines[i].partial_out(act.shape[0]))
            engines[i].start(act.shape[0])

        def high_nccl_start(i, act, weight=down, group=high_priority_group):
            nccl_start(i, act, weight, group)

        forms = {"matmuls_only": matmuls_only, "nccl": nccl, "nccl_fused_norm": partial(nccl, add_norm=fused_add_norm),
                 "nccl_sequence_parallel": nccl_sequence_parallel,
                 "torch_symm_mem": torch_symm_mem, "two_stage": two_stage_form,
                 "triton_matmul_nccl": partial(nccl, triton_matmul), "matmul_push_all_reduce": matmul_push_all_reduce,
                 "matmul_push_sequence_parallel": matmul_push_sequence_parallel,
                 "micro_batch_nccl": lambda: micro_batch(nccl_start, nccl_finish),
                 "micro_batch_nccl_high_priority": lambda: micro_batch(high_nccl_start, nccl_finish)}
        for prio, engines in copy_engine.items():
            forms["micro_batch_copy_engine" + ("" if prio == "default" else "_high_priority")] = (
                lambda engines=engines: micro_batch(partial(copy_engine_start, engines), lambda i: engines[i].finish()))
        for n, group in capped_groups.items():
            capped_start = partial(high_nccl_start, group=group)
            forms[f"micro_batch_nccl_ctas_{n}_high_priority"] = partial(micro_batch, capped_start, nccl_finish)
            forms[f"column_chunks_2_nccl_ctas_{n}_high_priority"] = partial(column_chunks, 2, capped_start, nccl_finish)
        for c, engines in column_copy_engine.items():
            forms[f"column_chunks_{c}_nccl_high_priority"] = partial(column_chunks, c, high_nccl_start, nccl_finish)
            forms[f"column_chunks_{c}_copy_engine_high_priority"] = partial(
                column_chunks, c, partial(copy_engine_start, engines), lambda j, engines=engines: engines[j].finish())
        unknown = sorted(set(only) - set(forms))
        if unknown:
            raise ValueError(f"FORM={','.join(unknown)}: not a form of this script; the forms: {', '.join(forms)}")
        forms = {name: form for name, form in forms.items() if not only or name in only or name == "nccl"}
        want = nccl().float()
        for name, form in forms.items():
            err = None
            if name != "matmuls_only":
                got = form().float()
                err = ((got - want).norm() / want.norm()).item()
            us, method = time_us(form, calls=5, replays=10)
            rows.append(dict(tokens=tokens, form=name, us=round(us, 1), rel_err_vs_nccl=err, timing=method))
    return rows


def main(argv: list[str]) -> None:
    if len(argv) not in (3, 4):
        raise SystemExit(__doc__.rsplit("\n\n", 1)[-1].strip())
    world, token_counts, out = int(argv[0]), [int(t) for t in argv[1].split(",")], argv[2]
    only = argv[3].split(",") if len(argv) == 4 else []
    if any(t % (2 * world) for t in token_counts):
        raise SystemExit(f"TOKENS={argv[1]}: every count must be a multiple of 2 x WORLD = {2 * world}")
    rows = spawn_ranks(_rank, world, token_counts, only, backend="nccl")[0]
    nccl = {r["tokens"]: r["us"] for r in rows if r["form"] == "nccl"}
    for r in rows:
        r["speedup_vs_nccl"] = round(nccl[r["tokens"]] / r["us"], 3)
        print(r)
    with open(out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), world=world, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
