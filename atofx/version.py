"""The version of atofx, in one place (the package and the command line's --version read it)."""

__version__ = "0.1.0"
