"""Several models behind one server: the pool, where its models come from, its routes."""
