"""Benchmarks behind ``rangedispatch-bench``: op level (all-reduce + residual + RMSNorm per
kernel tier) and model level (a TP block through each compile variant)."""
