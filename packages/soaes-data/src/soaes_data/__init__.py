"""soaes-data: Domain corpus curation: parse, clean, dedup, filter, curriculum, split, chat masks, packing."""

__version__ = "0.2.0"
