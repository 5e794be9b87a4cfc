"""Built-in parallel strategies: replicas (DDP) and shards (FSDP2)."""
