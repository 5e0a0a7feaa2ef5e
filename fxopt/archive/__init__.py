"""Saving and loading ``.fxopt`` files, and the validators that make loading never run code
(archive members, graph tables, symbolic expressions)."""
