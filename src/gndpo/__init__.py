"""gndpo: Globally Normalized Distillation Policy Optimization (arXiv 2606.09091).

On-policy distillation of language and vision-language models: a student samples, a teacher scores
every sampled token, and the per-token log-ratio rewards are z-scored over the whole batch before a
GSPO-style clipped policy update.
"""

__version__ = "0.1.0"
