"""
Callbacks of the imagecb provider: receive the vendor's completion callbacks, keep them, and hand
them to waiting triggers and event-driven DAGs. ``docs/callbacks.md`` explains the design.

* :mod:`~imagecb_provider.callbacks.tokens`: signed callback URLs (``callback_url``,
  ``asset_callback_url``) and the triggerer's ``watch_token``;
* :mod:`~imagecb_provider.callbacks.app`: the receiver's ``router`` and ``create_app()``, mounted
  by the plugin on the API server under ``/imagecb``; ``python -m imagecb_provider.callbacks``
  serves it alone;
* :mod:`~imagecb_provider.callbacks.receiver`: what the routes check and in which order;
* :mod:`~imagecb_provider.callbacks.store` and :mod:`~imagecb_provider.callbacks.schema`: the
  ``imagecb_callback`` table, created by :mod:`~imagecb_provider.callbacks.db`'s db-manager;
* :mod:`~imagecb_provider.callbacks.watcher`: the one shared long-poll per triggerer event loop.

Importing this package imports nothing heavy: each module is imported where it is used.
"""
