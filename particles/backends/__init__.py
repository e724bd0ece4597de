"""Alternative trajectory backends of :func:`particles.simulate` (``backend="torch"``: :mod:`.torch`)."""
