"""The arena pipeline: a pairwise preference classifier (A wins / B wins) trained in three
stages with ensemble soft pseudo-labels, response pairs generated through the serving pool, and an
fp16 submission export. See docs/architecture.md, "Arena".

Modules, one concept each:

* ``data``: pairwise records in the shapes real data has (winner spellings, Kaggle one-hot columns,
  ties, multi-turn pairs) -> parquet with folds (stable id hash), rejects and stats; A/B swap;
* ``template``: the classifier input (judge instruction, the turns' prompts and responses, verdict
  cue), fair head-and-tail truncation over every turn; standalone, shipped with submissions;
* ``model``: sequence classifier over a causal-LM base (last-token head), soft-target CE, Trainer
  with resumable checkpoints, prediction;
* ``stages``: a stage's data (labelled folds or pseudo-labels), the held-out fold guard, train, save;
* ``pseudo``: eval-only predictions (original and swapped), weighted soft-label merge with a margin;
* ``pairs``: prompt sampling for generators, A/B response pairs from their answers;
* ``export``, ``predict_entry``: fp16 submission folders with a standalone ``predict.py``, checked
  against the trained predictions; the ensemble;
* ``evaluate``, ``report``: log-loss, accuracy, the ensemble rule, table and plot;
* ``checks``: cross-checks of the ``arena:`` section; ``cli``: the ``arena-*`` subcommands.
"""
