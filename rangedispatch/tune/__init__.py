"""``rangedispatch-tune``: measure where each all-reduce tier pays and write a hardware profile."""
