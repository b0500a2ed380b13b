"""jail: run a program with every HTTP(S) request judged by a rule."""

__version__ = "0.1.0"
