"""Model parts: backbones, GNN heads, decoders, task heads, and the hybrid model that joins them."""
