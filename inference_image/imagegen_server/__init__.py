"""imagegen-server: a diffusers inference server with a multi-threaded stage pipeline.

Importing the package imports no torch: ``imagegen_server.config`` is shared with the operator.
"""

__version__ = "0.1.0"
