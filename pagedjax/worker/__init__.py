"""Device side: the model runner, KV pool, sampler, attention, sharding, swap transfers, fault recovery."""
