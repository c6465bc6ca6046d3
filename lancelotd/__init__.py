"""lancelotd: a preforking TCP daemon for the Lancelot question/answer protocol."""

__version__ = "0.1.0"
