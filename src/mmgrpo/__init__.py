"""mmgrpo: multi-module GRPO and prompt optimization for LM programs."""
__version__ = "0.1.0"
