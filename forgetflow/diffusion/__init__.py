"""Diffusion ML core: class-conditional DDPM teacher on digits, judge, SFD unlearning.

Modules: data (digits split), artifact (on-disk model version), train_base (teacher),
judge (evaluation classifier), sampling (DDIM / one-step), sfd (Score Forgetting
Distillation), methods (registry of unlearning methods), evaluate (metrics, grids),
calibrate (guidance sweep and promotion gates).
"""
