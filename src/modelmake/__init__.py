"""modelmake: the library behind the modelmake Snakemake workflow.

Every module here is plain Python (it never imports snakemake); rules call it through
``python -m modelmake <command>`` (see ``modelmake.cli``).
"""

__version__ = "0.1.0"
