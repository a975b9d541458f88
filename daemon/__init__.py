"""edgellm: a local language model daemon for Raspberry Pi-class boxes."""

__version__ = "0.1.0"
