"""``make soak``: a bounded fault run against real worker processes (see :mod:`soak.run`)."""
