"""Matmuls of the decode ranges: a Triton skinny GEMM where timing at compile time says it beats cuBLAS.

At a few tokens a linear layer only streams its weight, and cuBLAS reads it at 80-87% of the HBM's
bandwidth on H200 (3.8-4.2 of 4.8 TB/s), less on small weights. A kernel with one block of rows
(16 here) and narrow column tiles streams some of those weights faster, not all of them, which is
why each matmul is timed against cuBLAS at the range's sizes before it is replaced.

- ``skinny_gemm_op.py``: the op the pass puts in the graph, and its tile configurations;
- ``_skinny_gemm_triton.py``: its Triton kernel (imported on the first CUDA call only);
- ``skinny_gemm_tuning.py``: picks a configuration per weight shape and range, or keeps cuBLAS;
- ``skinny_gemm_pass.py``: the per-range pass.
"""
