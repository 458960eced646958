"""The ``arqonbus`` command line: one shared skeleton (admin/common.py) for the commands that talk to the mesh, and ``arqonbus dev``."""
