"""The application shell: the ``unirec`` command line and the demo."""
