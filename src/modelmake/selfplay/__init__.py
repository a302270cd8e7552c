"""The self-play pipeline: single-turn prompts, generation by the current model in
fractions (through modelmake.serve / modelmake.generate), KTO with an nnPU prior, iterations.

Modules: ``data`` (prompts, fractions, KTO pairs), ``loss`` (the nnPU KTO loss), ``train`` (the
KTOTrainer subclass and one iteration's training), ``evaluate`` (held-out metrics, plot), ``cli``.
"""
