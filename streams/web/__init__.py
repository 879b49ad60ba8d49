"""The worker's read-only web pages (``pages``), their data (``userview``, ``samples``, ``catalogue``) and
the token rule of the whole web view (``auth``)."""
