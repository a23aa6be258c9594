"""The command-line tools: rangedispatch-demo, rangedispatch-bench, rangedispatch-tune (Hydra apps)."""
