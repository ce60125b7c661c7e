"""Running one engine across the ranks of an ``mlx.launch`` job (``mx.distributed``).

Rank 0 schedules and samples; every other rank follows its step plans (``plan.py``) with
its share of the model and of the KV pool: a slice of every layer (``sharding.py``, tensor
parallel) or a run of layers (``pipeline.py``, ``--pipeline``), split while the model loads
(``attach.py``). ``world.py`` detects the job.
"""
