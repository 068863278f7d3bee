"""What serves batch DAGs rather than the API: prompt files, the archive store, the report."""
