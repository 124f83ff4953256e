"""citrus_ext: CItruS chunked instruction-aware state eviction (Bai et al., EMNLP 2024).

``torch.ops.citrus.*`` are registered on import; ``citrus_ext.ops`` holds their typed wrappers.
"""
from . import ops
from .ops import chunk_scores, compact_kv, evict, segmented_topk

__all__ = ["ops", "chunk_scores", "segmented_topk", "compact_kv", "evict"]
__version__ = "0.1.0"
