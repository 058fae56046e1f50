"""Beyond one engine and one process: several sampler replicas behind one sampler inbox (``clora.cluster.pool``),
and the runtime on a Ray cluster, the sampler replica(s) and the trainer in Ray actors (docs/scale-out.md).
Nothing is imported here; import what you use from its module. Ray is imported only by ``clora.cluster.link``
and what uses it, only when ``RuntimeConfig.cluster`` is set."""
