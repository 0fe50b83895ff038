"""Client-side mapping: exported allocations into this process, tables into tensors."""
