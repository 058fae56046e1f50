"""Beyond one engine: several sampler replicas behind one sampler inbox (``clora.cluster.pool``).
Nothing is imported here; import what you use from its module."""
