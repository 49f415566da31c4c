"""Planning: exact counting (params, MACs, FLOPs) and memory simulation / fitting."""
