"""Running one model across several processes (``mx.distributed``, started by ``mlx.launch``):
the model's tensor-parallel sharding and the engine's lock-step between ranks."""
