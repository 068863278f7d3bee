"""TaskFlow decorators of the imagecb provider (``@task.imagecb``)."""
