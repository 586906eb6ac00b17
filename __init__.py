"""groundforge: training data for knowledge-intensive visual grounding.

Beam pipelines collect fine-grained category images, find boxes, ask a teacher for rationales,
keep what passes the checks, and write Arrow shards that the bundled trainer reads.
"""

__version__ = "0.1.0"
