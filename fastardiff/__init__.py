"""fastardiff: export and run AR+diffusion generators with entropy-informed speculative decoding."""

__version__ = "0.1.0"
