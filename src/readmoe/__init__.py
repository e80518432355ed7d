"""readmoe: refactor a dense LLM into a router-decoupled Mixture-of-Experts (Read-ME) and serve it."""

from .modeling import ReadMEConfig, ReadMEForCausalLM, register

register()

__all__ = ["ReadMEConfig", "ReadMEForCausalLM"]
__version__ = "0.1.0"
