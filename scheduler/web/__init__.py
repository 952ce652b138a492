"""The HTTP side of te-scheduler: one WSGI app (``app``), its health check and its server."""
