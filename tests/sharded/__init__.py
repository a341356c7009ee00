"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy), two gloo processes: see ``run_fsdp2.py``."""
