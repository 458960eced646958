"""The browser chat demo (``/demo/chat``): a page on the JavaScript SDK (routes.py)."""
