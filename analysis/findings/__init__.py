"""Controlled experiments on the trained models: the resumable run driver, per-run measurements,
statistics over seeds and the plans behind the ablation and sink findings."""
