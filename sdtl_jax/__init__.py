"""sdtl_jax: synthetic-to-real transfer learning for vision, in JAX/Flax.

Implements Hennicke et al., "Investigating the Role of Fine-Tuning in Addressing the Gap
Between Synthetic and Real Data in Generative Foundation Models" (NeurIPS 2024 workshop).
"""

__version__ = '0.1.0'
