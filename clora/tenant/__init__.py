"""One experiment per tenant: the TenantActor, its step records and its checkpoints."""
