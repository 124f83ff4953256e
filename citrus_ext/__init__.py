"""citrus_ext: CItruS chunked instruction-aware state eviction (Bai et al., EMNLP 2024).

``torch.ops.citrus.*`` are registered on import; ``citrus_ext.ops`` holds their typed wrappers.
:func:`answer` reads a document with a Hugging Face model and answers an instruction;
:class:`ChunkedReader` drives the chunk loop for custom code; ``citrus_ext.policies`` holds the
eviction policies (one per file).
"""
from . import ops
from .ops import chunk_scores, compact_kv, evict, segmented_topk
from . import attention  # noqa: F401  (registers the "citrus" attention and mask functions)
from .api import Answer, answer, split_prompt
from .policies import POLICIES, make_policy
from .reader import ChunkedReader

__all__ = [
    "ops", "chunk_scores", "segmented_topk", "compact_kv", "evict",
    "answer", "Answer", "split_prompt", "ChunkedReader", "make_policy", "POLICIES",
]
__version__ = "0.1.0"
