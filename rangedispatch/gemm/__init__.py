"""Matmuls of the decode ranges: a Triton skinny GEMM where timing at compile time says it beats cuBLAS.

At a few tokens a linear layer only streams its weight, and cuBLAS reads it at 80-87% of the HBM's
bandwidth on H200 (3.8-4.2 of 4.8 TB/s), far less on small weights (k/v: 0.6-2.3 TB/s), each a
launch of its own. A kernel with one block of rows (16 or 32) and narrow column tiles streams some
of those weights faster, and one launch for all the weights that read one input (q/k/v, gate/up)
streams the small ones beside the large. Not always, which is why each launch is timed against
cuBLAS at the range's sizes before it replaces anything.

- ``skinny_gemm_op.py``: the op the pass puts in the graph, and its tile configurations;
- ``_skinny_gemm_triton.py``: its Triton kernel (imported on the first CUDA call only);
- ``skinny_gemm_tuning.py``: picks a configuration per group of weight shapes and range, or keeps cuBLAS;
- ``skinny_gemm_pass.py``: the per-range pass.
"""
