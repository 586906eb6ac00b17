"""Models and tools that add information to records (boxes, embeddings, answers)."""
