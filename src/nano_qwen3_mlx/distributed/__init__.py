"""Running one engine across the ranks of an ``mlx.launch`` job (``mx.distributed``).

Rank 0 schedules and samples; every other rank follows its step plans (``plan.py``) with
its shard of the model (``sharding.py``) and of the KV pool. ``world.py`` detects the job.
"""
