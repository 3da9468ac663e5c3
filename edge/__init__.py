"""What the adapters share at the HTTP edge: reading a request body safely (``body``), answering an
intake request the one way every route answers (``intake``: ``Rejected``, the 503 for what slipped
through, the latency metric), ``Retry-After`` parsing and the loopback and upstream-URL policy
(``upstream``).

The core (``mapping/``) never imports this package: it knows nothing of HTTP. Adapters and
``service`` do."""
