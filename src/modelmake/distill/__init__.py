"""The distillation pipeline: a teacher service over torch.distributed, a hybrid RWKV-style student,
hidden-state alignment (stage 1) and logit distillation (stage 2). See docs/architecture.md,
"Distillation".

Modules, one concept each:

* ``data``: chat SFT rows (assistant-only labels, not pre-shifted) and packed multilingual web text;
* ``hybrid``: the student, Llama + RWKV-style time-mix layers initialised from attention;
* ``service``: the teacher protocol (layout, handshake, server, remote and local clients);
* ``launch``: a stage's supervisor (teacher and trainer processes, readiness, fail-fast);
* ``train``: one process of a stage, a teacher or a trainer rank (checkpoints, DeepSpeed);
* ``losses``, ``evaluate``: masked hidden MSE, KL at temperature, CE; held-out perplexity and KL;
* ``cli``: the ``distill-*`` subcommands of ``python -m modelmake``.
"""
