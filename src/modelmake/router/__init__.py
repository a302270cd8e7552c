"""The router pipeline: an LLM that predicts the [[1]]..[[5]] score a weak model earns.

Modules, one concept each:

* ``tokens``: the five label tokens, the router's conversation format, adding tokens to a model;
* ``labels``: the labels built by the workflow (``router.build_labels``): prompts -> the weak and the
  strong model's answers -> a judge's MT-Bench-style grades -> scored prompts for ``data``;
* ``data``: labelled and / or scored prompts (any records source; scores per model on a declared scale)
  -> validated, seeded subsample -> train / calib / test parquet;
* ``train``: TRL SFT (assistant-only loss, EOS) under DeepSpeed ZeRO-3 or plain, resumable;
* ``consolidate``: a ZeRO-3 checkpoint -> one HF safetensors model folder (``zero_to_fp32``);
* ``score``: label-token logits at the answer position -> P([[k]]), expected score, P(weak ok);
* ``route``: a threshold calibrated as a quantile for a target strong-call share; ``Router``;
* ``evaluate``: threshold sweep, cost/quality curve vs random, APGR, CPT(x%) (RouteLLM);
* ``cli``: the ``router-*`` subcommands of ``python -m modelmake``.
"""
