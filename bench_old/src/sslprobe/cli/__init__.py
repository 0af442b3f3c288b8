"""The ``sslprobe`` command line (``demo``, ``plot``); nothing in the library imports it."""
