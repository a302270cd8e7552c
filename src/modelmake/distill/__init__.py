"""Distillation (seed 001): a teacher service over torch.distributed, a hybrid RWKV-style student,
hidden-state alignment (stage 1) and logit distillation (stage 2). See docs/architecture.md."""
