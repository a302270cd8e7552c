"""The arena pipeline (seed 003): a pairwise preference classifier (A wins / B wins) trained in three
stages with ensemble soft pseudo-labels, response pairs generated through the serving pool, and an
fp16 submission export. See docs/architecture.md, "The arena pipeline"."""
