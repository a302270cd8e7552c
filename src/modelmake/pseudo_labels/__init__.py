"""The pseudo-label pipeline: a teacher re-generates the assistant turns of chat datasets.

Modules: ``shard`` (stable-hash partitions and shards of a reformatted split), ``merge`` (generated
shards -> parquet with provenance, stats JSON, plot), ``cli`` (the ``shard`` and ``merge``
subcommands of ``python -m modelmake``). Serving (:mod:`modelmake.serve`) and generation
(:mod:`modelmake.generate`) are shared with the arena and self-play pipelines and stay top level.
See docs/architecture.md, "Pseudo-labels".
"""
