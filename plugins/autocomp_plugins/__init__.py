"""autocomp's built-in plugins, registered through the ``autocomp`` entry-point group exactly as a
third party's plugins are (see ``[project.entry-points.autocomp]`` in pyproject.toml)."""
