"""The sampling side: the SamplerActor over a vLLM engine, the SyncActor that publishes adapter
versions into it, the engine wrapper and its environment, adapter files, and clora's vLLM plugins.

Nothing is imported here: vLLM imports ``clora.sampler.cpu_lora_ops`` and
``clora.sampler.parent_watch`` in each of its processes, which must stay cheap.
"""
