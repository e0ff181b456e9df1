"""parspec: a speculative-decoding inference engine (P-EAGLE, Triton verification, SPD)."""

__version__ = "0.1.0"
